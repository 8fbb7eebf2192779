"""What every adapter shares: keyword tables, layout moves, the -1 sentinel, peer-state copying.

The one idea to hold: each peer class's constructor keywords live in one table of :class:`Option` rows (peer
default, the quantkit option it becomes, which values quantkit can honour). The same table parses the keywords,
gives the class its ``inspect.signature`` and writes the table in ``docs/compat_vector_quantize_pytorch.md``, so the
documented set and the accepted set cannot drift apart.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ...quantizers.codebook import Codebook

__all__ = ["UnsupportedKeywordError", "Option", "parse_options", "reject_call", "keyword_table_markdown"]


#: Marks a required positional parameter in :func:`set_signature`.
REQUIRED = inspect.Parameter.empty


class UnsupportedKeywordError(ValueError):
    """A peer keyword (or keyword value) that quantkit does not implement."""


@dataclass(frozen=True)
class Option:
    """One peer keyword.

    default: the peer's default.
    quantkit: what it becomes in quantkit (one line, for the docs table).
    supported: ``(value, all_values) -> bool``, whether quantkit honours that value; None: every value.
    hint: said when a value is refused: the quantkit equivalent, or why there is none.
    """

    default: Any
    quantkit: str
    supported: Callable[[Any, dict], bool] | None = None
    hint: str = ""


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return bool(a == b)
    except Exception:  # tensors, modules: only the identical object counts as the default
        return a is b


def only_default(default: Any) -> Callable[[Any, dict], bool]:
    return lambda value, _: _same(value, default)


def unless(flag: str, default: Any) -> Callable[[Any, dict], bool]:
    """Any value while ``flag`` is off (the peer ignores this keyword then, and so do we); the default otherwise."""
    return lambda value, values: not values[flag] or _same(value, default)


def parse_options(owner: str, table: dict[str, Option], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Peer keywords -> every keyword's value (defaults filled in); raises on unknown or unsupported ones."""
    for name in kwargs:
        if name not in table:
            raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {name!r}")
    values = {name: kwargs.get(name, opt.default) for name, opt in table.items()}
    for name, opt in table.items():
        if opt.supported is not None and not opt.supported(values[name], values):
            raise UnsupportedKeywordError(f"{owner}: {name}={values[name]!r} is not supported by quantkit's adapter; "
                                          f"{opt.hint or 'only ' + repr(opt.default) + ' is'}")
    return values


def reject_call(owner: str, **checks: tuple[Any, Any, str]) -> None:
    """Forward keywords: ``name=(value, supported default, hint)``; raises when value is not the default."""
    for name, (value, default, hint) in checks.items():
        if not _same(value, default):
            raise UnsupportedKeywordError(f"{owner}.forward: {name}={value!r} is not supported by quantkit's adapter; "
                                          f"{hint}")


def set_signature(cls: type, positional: list[tuple[str, Any]], table: dict[str, Option],
                  keyword_only: bool = False) -> None:
    """Gives ``cls.__init__`` the peer's signature (``positional`` then the table's keywords) for ``inspect``."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    kind = inspect.Parameter.KEYWORD_ONLY if keyword_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
    for name, default in positional:
        params.append(inspect.Parameter(name, kind, default=default))
    for name, opt in table.items():
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt.default))
    cls.__init__.__signature__ = inspect.Signature(params)
    cls.keywords = table


def keyword_table_markdown(table: dict[str, Option]) -> str:
    """The docs table: peer keyword | peer default | quantkit option (or "not supported: ...")."""
    rows = ["| peer keyword | peer default | quantkit |", "| --- | --- | --- |"]
    for name, opt in table.items():
        text = f"{opt.quantkit}: {opt.hint}" if opt.quantkit == "not supported" and opt.hint else opt.quantkit
        rows.append(f"| `{name}` | `{opt.default!r}` | {text} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------
# layout, masks, sentinels


def to_channels_last(x: Tensor, channel_first: bool) -> Tensor:
    """(B, C, *spatial) -> (B, *spatial, C) when channel_first, else x."""
    return x.movedim(1, -1) if channel_first else x


def from_channels_last(t: Tensor, channel_first: bool) -> Tensor:
    return t.movedim(-1, 1) if channel_first else t


def lens_to_mask(lens: Tensor, length: int) -> Tensor:
    """(B,) sequence lengths -> (B, length) bool, True on the first lens[b] positions."""
    return torch.arange(length, device=lens.device) < lens[:, None]


def apply_padding(out: Tensor, indices: Tensor, mask: Tensor | None, fill: Tensor | None,
                  extra_index_axes: int) -> tuple[Tensor, Tensor]:
    """The peer's padding contract: where ``mask`` (x.shape[:-1]) is False the output is ``fill`` (zeros when None)
    and every index is -1."""
    if mask is None:
        return out, indices
    fill = torch.zeros_like(out) if fill is None else fill.to(out.dtype)
    out = torch.where(mask[..., None], out, fill)
    index_mask = mask.reshape(*mask.shape, *([1] * extra_index_axes))
    return out, torch.where(index_mask, indices, -1)


def decode_with_sentinel(decode: Callable[[Tensor], Tensor], indices: Tensor) -> Tensor:
    """``decode(indices)`` (..., d) where -1 (padding, dropped depth) decodes to zeros instead of failing."""
    indices = indices.long()
    valid = indices >= 0
    out = decode(indices.clamp_min(0))
    return torch.where(valid[..., None], out, 0.0) if not bool(valid.all()) else out


# ----------------------------------------------------------------------------------------------------------------
# copying peer weights


def peer_tensor(state: dict[str, Tensor], *names: str) -> Tensor | None:
    """The first of ``names`` present in a peer state_dict (older peer versions nest the projection Linear)."""
    for name in names:
        if name in state:
            return state[name]
    return None


def load_linear(module: nn.Module, state: dict[str, Tensor], prefix: str) -> None:
    """Copies the peer's ``prefix`` Linear (``prefix.weight`` or ``prefix.0.weight``) into ``module``."""
    if isinstance(module, nn.Identity):
        if peer_tensor(state, f"{prefix}.weight", f"{prefix}.0.weight") is not None:
            raise ValueError(f"load_peer_state_dict: the peer has a {prefix} projection, this adapter has none "
                             "(were they built with the same dim / codebook_dim?)")
        return
    for field in ("weight", "bias"):
        value = peer_tensor(state, f"{prefix}.{field}", f"{prefix}.0.{field}")
        if value is None:
            if getattr(module, field) is not None:
                raise KeyError(f"load_peer_state_dict: missing {prefix}.{field}")
            continue
        getattr(module, field).data.copy_(value)


def load_projections(module: nn.Module, state: dict[str, Tensor], prefix: str = "") -> None:
    """Copies the peer's ``project_in`` / ``project_out`` into ``module``'s (the only weights FSQ and LFQ have)."""
    load_linear(module.project_in, state, f"{prefix}project_in")
    load_linear(module.project_out, state, f"{prefix}project_out")


@contextmanager
def swapped(modules, attr: str, make: Callable[[Any], Any]):
    """For one call, sets ``module.attr = make(module.attr)`` on every module, then restores the old values (the peer
    takes per-call options, e.g. a sampling temperature, that quantkit keeps on the quantizer)."""
    saved = [getattr(m, attr) for m in modules]
    for m, old in zip(modules, saved):
        setattr(m, attr, make(old))
    try:
        yield
    finally:
        for m, old in zip(modules, saved):
            setattr(m, attr, old)


@torch.no_grad()
def load_codebook(codebook: Codebook, state: dict[str, Tensor], prefix: str, head: int = 0) -> None:
    """Copies head ``head`` of the peer's ``prefix`` (embed (h, K, D), cluster_size (h, K), embed_avg, initted) into a
    quantkit :class:`Codebook` (weight, usage, embed_sum, initialized). The peer's buffers follow the same EMA
    formula as quantkit's, so training continues where the peer stopped."""
    embed = state[f"{prefix}.embed"][head]
    codebook.weight.data.copy_(embed)
    codebook.usage.copy_(state[f"{prefix}.cluster_size"][head])
    if codebook.ema is not None:
        codebook.embed_sum.copy_(state[f"{prefix}.embed_avg"][head])
    if f"{prefix}.initted" in state:
        codebook.initialized.fill_(bool(state[f"{prefix}.initted"]))
    codebook._pool = []

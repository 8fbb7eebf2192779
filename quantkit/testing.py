"""Property checks for any :class:`~quantkit.Quantizer`, and hypothesis strategies to drive them.

``check_quantizer(q)`` runs every invariant of the Quantizer contract on ``q`` (a registered quantizer or a user's
own subclass) and raises ``AssertionError`` naming the quantizer, the invariant and the first violation:

    from quantkit.testing import check_quantizer
    check_quantizer(MyQuantizer(dim=8, codebook_size=64))

Each invariant is also a public ``check_*`` function (``CHECKS`` lists them in order) so a test-suite can run one
per named test, over inputs drawn by the strategies ``latents(dim)``, ``quantizer_configs(name)`` and
``registered_quantizers()``.

The one idea to hold: every check works on deep copies under a private RNG, so checking never changes ``q`` or the
caller's random stream, and two copies given the same input and seed must behave identically.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import math
import re
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .quantizers._registry import example_kwargs, list_quantizers, quantizer_class
from .quantizers.base import Quantizer, QuantizerOutput

__all__ = ["CHECKS", "check_quantizer", "example_input", "latents", "quantizer_configs", "registered_quantizers",
           "utilization_after_training",
           "check_output_contract", "check_encode_matches_forward", "check_decode_round_trip", "check_eval_purity",
           "check_gradient", "check_state_dict_round_trip", "check_mask", "check_fully_masked_batch",
           "check_low_precision", "check_autocast", "check_bad_input", "check_empty_batch", "check_compile"]

_SEED = 1234


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _name(q: Quantizer) -> str:
    """The registered name of q's own class (a user's subclass of a registered class goes by its class name)."""
    return type(q).__dict__.get("registry_name") or type(q).__name__


def _fail(q: Quantizer, invariant: str, message: str) -> None:
    raise AssertionError(f"{_name(q)}: {invariant}: {message}")


@contextlib.contextmanager
def _seeded(seed: int = _SEED) -> Iterator[None]:
    """A private, seeded RNG: the caller's random stream is restored afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _copy(q: Quantizer, train: bool) -> Quantizer:
    q = copy.deepcopy(q)
    return q.train(train)


def _channels_last(q: Quantizer, x: Tensor) -> Tensor:
    return x.movedim(1, -1) if q.channel_first else x


def _from_channels_last(q: Quantizer, x: Tensor) -> Tensor:
    return x.movedim(-1, 1) if q.channel_first else x


def _indices_shape(q: Quantizer, x: Tensor) -> tuple[int, ...]:
    """The indices shape q promises for x: x's channels-last shape without its channel dim, plus (M,) for M indices
    per vector (``Quantizer._indices_shape``; a quantizer whose row is more than one vector overrides it)."""
    return tuple(q._indices_shape(tuple(_channels_last(q, x).shape)))


def _vector_shape(q: Quantizer, x: Tensor) -> tuple[int, ...]:
    """Shape of one entry per vector of x (the mask's shape): the indices shape without its (M,) axis."""
    shape = _indices_shape(q, x)
    return shape if q.num_indices == 1 else shape[:-1]


def _state(q: Quantizer) -> dict[str, Any]:
    """Every parameter and buffer (cloned), and every plain-Python attribute of every submodule (a flag kept as a
    bool is state too)."""
    state: dict[str, Any] = {f"{n}": t.detach().clone() for n, t in q.named_parameters(remove_duplicate=False)}
    state.update({f"{n}": t.detach().clone() for n, t in q.named_buffers(remove_duplicate=False)})
    for prefix, module in q.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training" or not isinstance(value, (bool, int, float, str)):
                continue
            state[f"{prefix}.{key}" if prefix else key] = value
    return state


def _first_difference(before: dict[str, Any], after: dict[str, Any], rtol: float = 0.0,
                      atol: float = 0.0) -> str | None:
    """Describes the first entry that differs between two ``_state`` snapshots (None when none does)."""
    for key in sorted(set(before) | set(after)):
        if key not in before or key not in after:
            return f"{key!r} {'appeared' if key not in before else 'disappeared'}"
        a, b = before[key], after[key]
        if isinstance(a, Tensor) != isinstance(b, Tensor):
            return f"{key!r} changed type from {type(a).__name__} to {type(b).__name__}"
        if not isinstance(a, Tensor):
            if a != b:
                return f"{key!r} changed from {a!r} to {b!r}"
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{key!r} changed from {a.dtype}{tuple(a.shape)} to {b.dtype}{tuple(b.shape)}"
        # Sums over other row orders: tolerate rounding relative to the tensor's largest entry, not each entry's.
        if not _close(a, b, rtol, atol + rtol * _scale(a.float()) if a.is_floating_point() else 0.0):
            diff = (a.double() - b.double()).abs().nan_to_num(math.inf).max() if a.numel() else 0.0
            return f"{key!r} changed (max abs difference {float(diff):.3g})"
    return None


def _close(a: Tensor, b: Tensor, rtol: float = 0.0, atol: float = 0.0) -> bool:
    if a.shape != b.shape:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return bool(torch.equal(a, b))
    return bool(torch.allclose(a, b.to(a.dtype), rtol=rtol, atol=atol, equal_nan=True))


def _scale(*tensors: Tensor) -> float:
    """Largest magnitude among tensors, for tolerances that follow the data's scale."""
    return max([float(t.detach().abs().max()) for t in tensors if t.numel()] + [1e-30])


def _assert_close(q: Quantizer, invariant: str, what: str, got: Tensor, expected: Tensor, rtol: float,
                  atol: float) -> None:
    if got.shape != expected.shape:
        _fail(q, invariant, f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if not _close(got, expected, rtol, atol):
        bad = ~torch.isclose(got.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)
        where = tuple(int(i) for i in bad.nonzero()[0]) if bad.any() else ()
        _fail(q, invariant, f"{what} differs at {int(bad.sum())} of {got.numel()} entries; first at {where}: "
                            f"got {got[where].tolist()}, expected {expected[where].tolist()}")


def _assert_equal(q: Quantizer, invariant: str, what: str, got: Tensor, expected: Tensor) -> None:
    _assert_close(q, invariant, what, got, expected, 0.0, 0.0)


def _assert_same_stats(q: Quantizer, invariant: str, got: dict[str, Tensor], expected: dict[str, Tensor],
                       rtol: float, atol: float) -> None:
    if set(got) != set(expected):
        _fail(q, invariant, f"stats keys {sorted(got)} differ from {sorted(expected)}")
    for key in got:
        _assert_close(q, invariant, f"stats[{key!r}]", got[key].detach(), expected[key].detach(), rtol, atol)


def _loss_tolerance(*losses: Tensor) -> tuple[float, float]:
    # losses are means over rows: the same rows summed in another order agree to a few float32 ulps.
    return 1e-5, 1e-6 * _scale(*losses)


def utilization_after_training(q: Quantizer, x: Tensor, optimizer: torch.optim.Optimizer, steps: int,
                                loss_fn: Callable[[QuantizerOutput], Tensor] | None = None) -> float:
    """Fraction of q's codebook that ``q.encode(x)`` uses (in eval mode) after ``steps`` optimizer steps on x.

    The loss is the quantizer's own ``out.loss`` unless ``loss_fn(out)`` is given: the measurement behind tests of
    codebook collapse and dead-code revival.
    """
    q.train()
    for _ in range(steps):
        out = q(x)
        loss = out.loss if loss_fn is None else loss_fn(out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    q.eval()
    return q.encode(x).unique().numel() / q.codebook_size


def example_input(q: Quantizer, batch: int = 2, length: int = 6, dtype: torch.dtype = torch.float32,
                  seed: int = 0, device: torch.device | str | None = None) -> Tensor:
    """A small standard-normal input for ``q``: (batch, length, dim), or (batch, dim, length) when channel_first.

    A quantizer that takes only some input shapes (e.g. whole feature maps of one size) defines
    ``example_input(batch, generator) -> Tensor`` (float32, on CPU) and it is used instead of this layout."""
    if device is None:
        device = next(iter(q.parameters()), next(iter(q.buffers()), torch.empty(0))).device
    gen = torch.Generator().manual_seed(seed)
    own = getattr(q, "example_input", None)
    if callable(own):
        x = own(batch, gen)
    else:
        x = _from_channels_last(q, torch.randn(batch, length, q.dim, generator=gen))
    return x.to(device=device, dtype=dtype)


def _check_output(q: Quantizer, invariant: str, x: Tensor, out: Any) -> None:
    """The shared output contract: types, shapes, dtypes, index range, loss and stats."""
    if not isinstance(out, QuantizerOutput):
        _fail(q, invariant, f"forward returned {type(out).__name__}, expected QuantizerOutput")
    if not isinstance(out.quantized, Tensor) or out.quantized.shape != x.shape:
        got = tuple(out.quantized.shape) if isinstance(out.quantized, Tensor) else type(out.quantized).__name__
        _fail(q, invariant, f"quantized has shape {got}, expected x's shape {tuple(x.shape)}")
    if out.quantized.dtype != x.dtype:
        _fail(q, invariant, f"quantized has dtype {out.quantized.dtype}, expected x's dtype {x.dtype}")
    if out.quantized.numel() and not bool(torch.isfinite(out.quantized).all()):
        _fail(q, invariant, "quantized contains NaN or inf for a finite x")
    if out.indices.dtype != torch.int64:
        _fail(q, invariant, f"indices have dtype {out.indices.dtype}, expected torch.int64")
    if tuple(out.indices.shape) != _indices_shape(q, x):
        _fail(q, invariant, f"indices have shape {tuple(out.indices.shape)}, expected {_indices_shape(q, x)}"
                            f" (num_indices={q.num_indices})")
    if out.indices.numel():
        # -1 marks a depth skipped by quantize-dropout: allowed only for multi-index quantizers in training.
        low = -1 if (q.training and q.num_indices > 1) else 0
        lo, hi = int(out.indices.min()), int(out.indices.max())
        if lo < low or hi >= q.codebook_size:
            _fail(q, invariant, f"indices span [{lo}, {hi}], outside [{low}, {q.codebook_size})"
                                f"{' in training' if q.training else ' in eval'}")
    if not isinstance(out.loss, Tensor) or out.loss.dtype != torch.float32 or out.loss.dim() != 0:
        got = f"{out.loss.dtype} of shape {tuple(out.loss.shape)}" if isinstance(out.loss, Tensor) else out.loss
        _fail(q, invariant, f"loss is {got}, expected a float32 scalar")
    if not bool(torch.isfinite(out.loss)):
        _fail(q, invariant, f"loss is {float(out.loss)}")
    if not isinstance(out.stats, dict):
        _fail(q, invariant, f"stats is a {type(out.stats).__name__}, expected a dict")
    for key in ("perplexity", "usage"):
        if key not in out.stats:
            _fail(q, invariant, f"stats has no {key!r} (keys: {sorted(out.stats)})")
    for key, value in out.stats.items():
        if not isinstance(value, Tensor) or value.dim() != 0:
            _fail(q, invariant, f"stats[{key!r}] is not a scalar tensor: {value!r}")
        if value.requires_grad:
            _fail(q, invariant, f"stats[{key!r}] is not detached")
        if not bool(torch.isfinite(value)):
            _fail(q, invariant, f"stats[{key!r}] is {float(value)}")
    usage, perplexity = float(out.stats["usage"]), float(out.stats["perplexity"])
    if not 0.0 <= usage <= 1.0:
        _fail(q, invariant, f"stats['usage'] is {usage}, outside [0, 1]")
    if perplexity > q.codebook_size * (1 + 1e-4) or perplexity < 0:
        _fail(q, invariant, f"stats['perplexity'] is {perplexity}, outside [0, codebook_size={q.codebook_size}]")


def _invariant(check: Callable[..., None]) -> Callable[..., None]:
    """Makes any exception a check meets (the quantizer raising on valid input) an AssertionError naming q."""

    @functools.wraps(check)
    def run(q: Quantizer, *args: Any, **kwargs: Any) -> None:
        try:
            check(q, *args, **kwargs)
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - an unexpected exception is the finding
            what = check.__name__.removeprefix("check_").replace("_", " ")
            raise AssertionError(f"{_name(q)}: {what}: raised {type(e).__name__} on a valid call: {e}") from e

    return run


# ----------------------------------------------------------------------------------------------------------------
# the invariants


@_invariant
def check_output_contract(q: Quantizer, x: Tensor) -> None:
    """In training and in eval: quantized has x's shape and dtype, indices are int64 of shape x.shape[:-1]
    (+ (M,)) within [0, codebook_size), loss is a finite float32 scalar, stats are detached finite scalars with
    ``perplexity`` and ``usage``."""
    for train in (True, False):
        invariant = f"output contract ({'train' if train else 'eval'})"
        with _seeded():
            _check_output(q, invariant, x, _copy(q, train)(x))


@_invariant
def check_encode_matches_forward(q: Quantizer, x: Tensor) -> None:
    """In eval, ``encode(x)`` gives the indices of ``forward(x)``."""
    q = _copy(q, False)
    with _seeded():
        out = q(x)
    with _seeded():
        indices = q.encode(x)
    _assert_equal(q, "eval encode(x) == forward(x).indices", "encode(x)", indices, out.indices)


@_invariant
def check_decode_round_trip(q: Quantizer, x: Tensor) -> None:
    """In eval, ``decode(q(x).indices)`` equals ``q(x).quantized`` (to a few float32 ulps of the data's scale:
    straight-through adds and subtracts z); for ``soft`` quantizers decode gives the most probable codes, so only
    its shape, dtype and determinism are checked."""
    q = _copy(q, False)
    invariant = "eval decode(q(x).indices) == q(x).quantized"
    with _seeded():
        out = q(x)
    decoded = q.decode(out.indices)
    if decoded.shape != x.shape:
        _fail(q, invariant, f"decode gives shape {tuple(decoded.shape)}, expected x's shape {tuple(x.shape)}")
    if not decoded.is_floating_point():
        _fail(q, invariant, f"decode gives dtype {decoded.dtype}, expected a floating dtype")
    if decoded.numel() and not bool(torch.isfinite(decoded).all()):
        _fail(q, invariant, "decode gives NaN or inf")
    if q.soft:
        _assert_equal(q, invariant, "decode (twice)", q.decode(out.indices), decoded)
        return
    expected = out.quantized.to(decoded.dtype)
    eps = torch.finfo(torch.float32).eps
    _assert_close(q, invariant, "decode(indices)", decoded, expected, rtol=16 * eps,
                  atol=16 * eps * _scale(_channels_last(q, x).float(), expected))


@_invariant
def check_eval_purity(q: Quantizer, x: Tensor) -> None:
    """In eval, forward (with and without a mask), encode and decode change no parameter, buffer or plain-Python
    attribute, and repeating forward gives identical outputs."""
    q = _copy(q, False)
    invariant = "eval changes no parameter or buffer"
    before = _state(q)
    mask = _default_mask(q, x)
    with _seeded():
        first = q(x)
        q(x, mask=mask)
        q.encode(x)
        q.decode(first.indices)
        second = q(x)
    diff = _first_difference(before, _state(q))
    if diff is not None:
        _fail(q, invariant, diff)
    invariant = "eval forward is deterministic"
    _assert_equal(q, invariant, "indices of a second forward", second.indices, first.indices)
    _assert_equal(q, invariant, "quantized of a second forward", second.quantized, first.quantized)
    _assert_equal(q, invariant, "loss of a second forward", second.loss, first.loss)


@_invariant
def check_gradient(q: Quantizer, x: Tensor, identity: bool | None = None) -> None:
    """In training, the gradient of ``quantized`` reaches x and is finite; when ``identity`` (default:
    ``q.identity_gradient``) it equals the incoming gradient (straight-through). The loss's gradients to x and to
    every parameter are finite."""
    q = _copy(q, True)
    identity = bool(getattr(q, "identity_gradient", False)) if identity is None else identity
    invariant = "straight-through gradient"
    xr = x.detach().clone().requires_grad_(True)
    with _seeded():
        out = q(xr)
        grad_out = torch.randn_like(out.quantized)
    if not out.quantized.requires_grad:
        _fail(q, invariant, "quantized does not require grad for an x that does (no gradient reaches x)")
    (grad_x,) = torch.autograd.grad(out.quantized, xr, grad_out, retain_graph=True, allow_unused=True)
    if grad_x is None:
        _fail(q, invariant, "no gradient reaches x from quantized")
    if not bool(torch.isfinite(grad_x).all()):
        _fail(q, invariant, "the gradient to x contains NaN or inf")
    if identity:
        eps = torch.finfo(grad_x.dtype).eps
        _assert_close(q, "straight-through gradient equals identity (identity_gradient=True)", "d quantized / d x "
                      "applied to a random gradient", grad_x, grad_out, rtol=4 * eps, atol=4 * eps * _scale(grad_out))
    if out.loss.requires_grad:
        out.loss.backward()
        for name, t in [("x", xr), *q.named_parameters()]:
            if t.grad is not None and not bool(torch.isfinite(t.grad).all()):
                _fail(q, "loss gradients are finite", f"the loss's gradient to {name} contains NaN or inf")


def _perturbed(q: Quantizer) -> Quantizer:
    """A copy of q whose every parameter and buffer holds other values, so that a load must restore them all."""
    q = copy.deepcopy(q)
    gen = torch.Generator().manual_seed(_SEED)
    with torch.no_grad():
        for t in [*q.parameters(), *q.buffers()]:
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen).to(t) * (1 + t.abs().max() if t.numel() else 1))
            else:
                t.zero_()
    return q


@_invariant
def check_state_dict_round_trip(q: Quantizer, x: Tensor, make: Callable[[], Quantizer] | None = None) -> None:
    """After a training step, ``state_dict`` saved with ``torch.save`` and loaded (``weights_only=True``) into a
    fresh quantizer (``make()``, else a copy with every tensor overwritten) gives identical eval outputs."""
    invariant = "state_dict save/load gives identical indices"
    q = _copy(q, True)
    with _seeded():
        q(x)
    q.eval()
    with _seeded():
        expected = q(x)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    try:
        state = torch.load(buffer, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a state_dict that needs pickle is the finding
        _fail(q, invariant, f"the state_dict does not load with weights_only=True: {type(e).__name__}: {e}")
    with _seeded():
        fresh = make() if make is not None else _perturbed(q)
    try:
        fresh.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        _fail(q, invariant, f"load_state_dict into a fresh quantizer failed: {type(e).__name__}: {e}")
    fresh.eval()
    with _seeded():
        got = fresh(x)
    _assert_equal(q, invariant, "indices after load", got.indices, expected.indices)
    _assert_equal(q, invariant, "quantized after load", got.quantized, expected.quantized)


def _default_mask(q: Quantizer, x: Tensor) -> Tensor:
    """Every third vector masked out (at least one in, and one out when there are two vectors)."""
    shape = _vector_shape(q, x)
    mask = torch.arange(math.prod(shape), device=x.device) % 3 != 1
    return mask.reshape(shape)


@_invariant
def check_mask(q: Quantizer, x: Tensor, mask: Tensor | None = None) -> None:
    """In training, forward(x, mask) matches forward on the masked-in vectors alone (two copies, one seed): the same
    loss, stats, indices and quantized on those vectors, the same parameter gradients, no loss gradient to the
    masked-out vectors, and the same parameters, buffers and attributes afterwards."""
    invariant = "masked-out vectors change nothing"
    mask = _default_mask(q, x) if mask is None else mask
    full, part = _copy(q, True), _copy(q, True)
    x_full = x.detach().clone().requires_grad_(True)
    x_part = _from_channels_last(q, _channels_last(q, x).detach()[mask]).clone().requires_grad_(True)
    with _seeded():
        out_full = full(x_full, mask=mask)
    with _seeded():
        out_part = part(x_part)
    # Compared channels-last: (n, ..., dim) on both sides.
    q_full_in = _channels_last(q, out_full.quantized)[mask]
    q_part = _channels_last(q, out_part.quantized)
    grad_out = torch.randn(q_part.shape, generator=torch.Generator().manual_seed(_SEED)).to(q_part)
    idx_full_in = out_full.indices[mask]
    _assert_equal(q, invariant, "indices of the masked-in vectors", idx_full_in, out_part.indices)
    eps = torch.finfo(torch.float32).eps
    _assert_close(q, invariant, "quantized of the masked-in vectors", q_full_in, q_part,
                  rtol=16 * eps, atol=16 * eps * _scale(q_part))
    rtol, atol = _loss_tolerance(out_full.loss, out_part.loss)
    _assert_close(q, invariant, "loss", out_full.loss.detach(), out_part.loss.detach(), rtol, atol)
    _assert_same_stats(q, invariant, out_full.stats, out_part.stats, 1e-5, 1e-6)
    # Gradients: the same objective on both sides.
    total_full = out_full.loss + (q_full_in * grad_out).sum()
    total_part = out_part.loss + (q_part * grad_out).sum()
    if total_full.requires_grad and total_part.requires_grad:
        total_full.backward()
        total_part.backward()
        if x_full.grad is not None:
            leaked = _channels_last(q, x_full.grad)[~mask]
            if leaked.numel() and bool((leaked != 0).any()):
                _fail(q, invariant, "the loss sends a gradient to masked-out vectors")
        grads_part = dict(part.named_parameters())
        for name, p in full.named_parameters():
            g_full, g_part = p.grad, grads_part[name].grad
            if (g_full is None) != (g_part is None):
                _fail(q, invariant, f"parameter {name!r} gets a gradient on one side only")
            if g_full is not None:
                _assert_close(q, invariant, f"gradient of {name!r}", g_full, g_part, 1e-4,
                              1e-5 * _scale(g_full, g_part))
    diff = _first_difference(_state(full), _state(part), rtol=1e-5, atol=1e-6)
    if diff is not None:
        _fail(q, invariant, f"after the step, {diff} between the masked and the subset forward")


@_invariant
def check_fully_masked_batch(q: Quantizer, x: Tensor) -> None:
    """In training, a batch whose every vector is masked out gives a finite loss and finite stats (no 0 / 0)."""
    q = _copy(q, True)
    mask = torch.zeros(_vector_shape(q, x), dtype=torch.bool, device=x.device)
    with _seeded():
        out = q(x, mask=mask)
    _check_output(q, "a fully masked batch gives finite loss and stats", x, out)


@_invariant
def check_low_precision(q: Quantizer, x: Tensor) -> None:
    """In eval, float16 and bfloat16 inputs give quantized in their own dtype and exactly the indices of the same
    values in float32: quantizers compute in float32 whatever the input dtype (so indices differ from those of the
    unrounded float32 x only where rounding x moves it across a decision boundary, i.e. at near-ties)."""
    q = _copy(q, False)
    for dtype in (torch.float16, torch.bfloat16):
        invariant = f"{str(dtype).removeprefix('torch.')} input gives the float32 indices"
        low = x.to(dtype)
        with _seeded():
            out = q(low)
        with _seeded():
            ref = q(low.float())
        _check_output(q, invariant, low, out)
        _assert_equal(q, invariant, "indices", out.indices, ref.indices)
        _assert_equal(q, invariant, "quantized", out.quantized, ref.quantized.to(dtype))


@_invariant
def check_autocast(q: Quantizer, x: Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
    """In eval under ``torch.autocast(dtype)``, a float32 x gives the float32 indices: the code choice is not
    computed in reduced precision (users train under autocast)."""
    q = _copy(q, False)
    invariant = f"autocast({str(dtype).removeprefix('torch.')}) gives the float32 indices"
    with _seeded():
        ref = q(x)
    with _seeded(), torch.autocast(x.device.type, dtype=dtype):
        out = q(x)
    _assert_equal(q, invariant, "indices", out.indices, ref.indices)
    if not bool(torch.isfinite(out.loss)):
        _fail(q, invariant, f"loss is {float(out.loss)}")


def _value_error_or_result(q: Quantizer, invariant: str, what: str, argument: str,
                           call: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, None) when ``call()`` raises a ValueError naming ``argument``, (False, its result) when it returns;
    any other exception, or a ValueError that does not name the argument, is a violation."""
    try:
        return False, call()
    except ValueError as e:
        if not re.search(rf"\b{argument}\b", str(e)):
            _fail(q, invariant, f"{what}: the ValueError does not name {argument!r}: {e}")
        return True, None
    except Exception as e:  # noqa: BLE001 - the wrong exception type is the finding
        _fail(q, invariant, f"{what}: raised {type(e).__name__} instead of ValueError: {e}")
    raise AssertionError("unreachable")


@_invariant
def check_bad_input(q: Quantizer, x: Tensor) -> None:
    """In training and eval, a wrong channel size, an integer x, NaN or inf in x, a mask of the wrong shape or
    dtype, and out-of-range or non-int64 indices for decode raise a ValueError naming the argument, and change no
    parameter, buffer or attribute."""
    x_cl = _channels_last(q, x)
    wider = _from_channels_last(q, torch.cat([x_cl, x_cl[..., :1]], dim=-1))
    poisoned = []
    for value in (math.nan, math.inf, -math.inf):
        bad = x_cl.clone(memory_format=torch.contiguous_format)
        bad.view(-1)[bad.numel() // 2] = value
        poisoned.append((f"x containing {value}", _from_channels_last(q, bad)))
    shape = _vector_shape(q, x)
    indices_shape = _indices_shape(q, x)
    lowest = -1 if q.num_indices > 1 else 0
    cases: list[tuple[str, str, Callable[[Quantizer], Any]]] = [
        ("x with dim + 1 channels", "x", lambda m: m(wider)),
        ("x with dim + 1 channels (encode)", "x", lambda m: m.encode(wider)),
        ("integer x", "x", lambda m: m(x.round().to(torch.int64))),
        ("integer x (encode)", "x", lambda m: m.encode(x.round().to(torch.int32))),
        *[(what, "x", lambda m, bad=bad: m(bad)) for what, bad in poisoned],
        *[(what + " (encode)", "x", lambda m, bad=bad: m.encode(bad)) for what, bad in poisoned],
        ("mask of the wrong shape", "mask",
         lambda m: m(x, mask=torch.ones((*shape, 2), dtype=torch.bool, device=x.device))),
        ("float mask", "mask", lambda m: m(x, mask=torch.ones(shape, device=x.device))),
        ("indices == codebook_size", "indices",
         lambda m: m.decode(torch.full(indices_shape, q.codebook_size, dtype=torch.int64, device=x.device))),
        ("negative indices", "indices",  # -1 is the skipped-depth sentinel of multi-index quantizers
         lambda m: m.decode(torch.full(indices_shape, lowest - 1, dtype=torch.int64, device=x.device))),
        ("int32 indices", "indices",
         lambda m: m.decode(torch.zeros(indices_shape, dtype=torch.int32, device=x.device))),
    ]
    for train in (True, False):
        m = _copy(q, train)
        before = _state(m)
        mode = "train" if train else "eval"
        for what, argument, call in cases:
            invariant = f"bad input raises ValueError ({mode})"
            with _seeded():
                raised, _ = _value_error_or_result(q, invariant, what, argument, lambda: call(m))
            if not raised:
                _fail(q, invariant, f"{what}: no error raised")
            diff = _first_difference(before, _state(m))
            if diff is not None:
                _fail(q, f"bad input leaves every buffer unchanged ({mode})", f"{what}: {diff}")


@_invariant
def check_empty_batch(q: Quantizer, x: Tensor) -> None:
    """In training and eval, an empty batch either works (empty quantized and indices, finite loss and stats) or
    raises a ValueError naming x; encode and decode of nothing give nothing."""
    x_cl = _channels_last(q, x)
    empty = _from_channels_last(q, x_cl[:0])
    for train in (True, False):
        m = _copy(q, train)
        invariant = f"empty batch ({'train' if train else 'eval'})"
        with _seeded():
            raised, out = _value_error_or_result(q, invariant, "forward of an empty batch", "x", lambda: m(empty))
        if raised:
            continue
        _check_output(m, invariant, empty, out)
        if not train:
            indices = m.encode(empty)
            _assert_equal(q, invariant, "encode of an empty batch", indices, out.indices)
            decoded = m.decode(indices)
            if decoded.shape != empty.shape:
                _fail(q, invariant, f"decode of no indices has shape {tuple(decoded.shape)}, expected "
                                    f"{tuple(empty.shape)}")


@_invariant
def check_compile(q: Quantizer, x: Tensor, backend: str = "inductor") -> None:
    """In eval, ``torch.compile(q, fullgraph=True)`` gives eager's indices, and its quantized, loss and stats to
    float32 rounding."""
    q = _copy(q, False)
    invariant = f"torch.compile(fullgraph=True, backend={backend!r}) eval forward matches eager"
    with _seeded():
        expected = q(x)
    compiled = torch.compile(q, fullgraph=True, backend=backend)
    # Every quantizer shares Quantizer.forward: lift dynamo's per-code-object recompile limit, which would
    # otherwise silently fall back to eager after a few quantizers.
    with torch._dynamo.config.patch(recompile_limit=1 << 20, accumulated_recompile_limit=1 << 20), _seeded():
        try:
            got = compiled(x)
        except Exception as e:  # noqa: BLE001 - graph breaks and compile errors are the finding
            first_lines = "\n".join(str(e).splitlines()[:6])
            _fail(q, invariant, f"compiling raised {type(e).__name__}: {first_lines}")
    _assert_equal(q, invariant, "indices", got.indices, expected.indices)
    eps = torch.finfo(torch.float32).eps
    _assert_close(q, invariant, "quantized", got.quantized, expected.quantized, rtol=64 * eps,
                  atol=64 * eps * _scale(expected.quantized, x))
    _assert_close(q, invariant, "loss", got.loss, expected.loss, rtol=1e-4, atol=1e-6 * _scale(expected.loss))
    _assert_same_stats(q, invariant, got.stats, expected.stats, 1e-4, 1e-6)


#: Every check, in the order ``check_quantizer`` runs them (``check_compile`` only when asked).
CHECKS: dict[str, Callable[..., None]] = {
    "output_contract": check_output_contract,
    "encode_matches_forward": check_encode_matches_forward,
    "decode_round_trip": check_decode_round_trip,
    "eval_purity": check_eval_purity,
    "gradient": check_gradient,
    "state_dict_round_trip": check_state_dict_round_trip,
    "mask": check_mask,
    "fully_masked_batch": check_fully_masked_batch,
    "low_precision": check_low_precision,
    "autocast": check_autocast,
    "bad_input": check_bad_input,
    "empty_batch": check_empty_batch,
    "compile": check_compile,
}


def check_quantizer(q: Quantizer, x: Tensor | None = None, *, make: Callable[[], Quantizer] | None = None,
                    compile: bool = False, compile_backend: str = "inductor", skip: tuple[str, ...] = ()) -> None:
    """Runs every invariant of the Quantizer contract on ``q`` and raises AssertionError at the first violation.

    Args:
        q: any Quantizer (left unchanged: every check works on a deep copy).
        x: a finite float32 input (default: ``example_input(q)``); use several vectors, some of them masked out by
            ``check_mask``'s default mask (every third).
        make: builds a fresh, untrained quantizer of the same configuration, for the state_dict check (default: a
            copy of q with every tensor overwritten).
        compile: also check ``torch.compile(fullgraph=True)`` (slow: tens of seconds on a CPU).
        compile_backend: the torch.compile backend for that check.
        skip: names of ``CHECKS`` not to run.
    """
    if not isinstance(q, Quantizer):
        raise TypeError(f"check_quantizer: q must be a quantkit.Quantizer, got {type(q).__name__}")
    unknown = set(skip) - set(CHECKS)
    if unknown:
        raise ValueError(f"check_quantizer: skip names unknown checks {sorted(unknown)}; known: {list(CHECKS)}")
    x = example_input(q) if x is None else x
    with _seeded():
        for name, check in CHECKS.items():
            if name in skip or (name == "compile" and not compile):
                continue
            if name == "state_dict_round_trip":
                check(q, x, make=make)
            elif name == "compile":
                check(q, x, backend=compile_backend)
            else:
                check(q, x)


# ----------------------------------------------------------------------------------------------------------------
# hypothesis strategies (hypothesis is imported lazily: it is a test dependency, not a runtime one)


def latents(dim: int, *, channel_first: bool = False, dtypes: tuple[torch.dtype, ...] = (torch.float32,),
            min_vectors: int = 1, max_vectors: int = 48, max_leading_dims: int = 3,
            log10_scale: tuple[float, float] = (-2.0, 2.0), device: torch.device | str = "cpu"):
    """Strategy for inputs of a quantizer of size ``dim``: (*lead, dim) (or (B, dim, *spatial) when
    ``channel_first``) with 1 to ``max_leading_dims`` leading dims and ``min_vectors`` to ``max_vectors`` vectors,
    in one of ``dtypes``, at a scale 10^s for s in ``log10_scale``, drawn as Gaussian, uniform, clustered (a few
    centres plus small noise, as encoder outputs are) or with repeated vectors (ties). Values come from a seeded
    torch generator, so hypothesis shrinks the shape, the scale and the seed rather than each value."""
    from hypothesis import strategies as st

    @st.composite
    def draw_latents(draw) -> Tensor:
        num_lead = draw(st.integers(2 if channel_first and max_leading_dims >= 2 else 1, max_leading_dims))
        lead, room = [], max_vectors
        for i in range(num_lead):
            lowest = 0 if min_vectors == 0 else 1
            size = draw(st.integers(lowest, max(lowest, min(8, room))))
            lead.append(size)
            room = max(1, room // max(size, 1))
        if math.prod(lead) < min_vectors:
            lead[0] = math.ceil(min_vectors / max(1, math.prod(lead[1:])))
        scale = 10.0 ** draw(st.floats(*log10_scale, allow_nan=False))
        kind = draw(st.sampled_from(["normal", "uniform", "clustered", "repeated"]))
        dtype = draw(st.sampled_from(dtypes))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        n = math.prod(lead)
        if kind == "normal":
            rows = torch.randn(n, dim, generator=gen)
        elif kind == "uniform":
            rows = torch.rand(n, dim, generator=gen) * 2 - 1
        elif kind == "clustered":
            centres = torch.randn(3, dim, generator=gen)
            rows = centres[torch.randint(0, 3, (n,), generator=gen)] + 0.05 * torch.randn(n, dim, generator=gen)
        else:
            distinct = torch.randn(max(1, n // 3), dim, generator=gen)
            rows = distinct[torch.randint(0, distinct.shape[0], (n,), generator=gen)]
        x = (rows * scale).reshape(*lead, dim).to(device=device, dtype=dtype)
        return x.movedim(-1, 1) if channel_first else x

    return draw_latents()


def quantizer_configs(name: str, *, channel_first: Any = None, **overrides: Any):
    """Strategy for constructor keywords of the quantizer registered as ``name``: its registered example, with
    each override applied (a hypothesis strategy is drawn, any other value used as is). ``channel_first`` defaults
    to drawing both layouts when the constructor takes it."""
    from hypothesis import strategies as st
    from hypothesis.strategies import SearchStrategy

    base = example_kwargs(name)
    if channel_first is None and "channel_first" in inspect.signature(quantizer_class(name)).parameters:
        channel_first = st.booleans()
    if channel_first is not None:
        overrides = {"channel_first": channel_first, **overrides}

    @st.composite
    def draw_config(draw) -> dict[str, Any]:
        kwargs = dict(base)
        for key, value in overrides.items():
            kwargs[key] = draw(value) if isinstance(value, SearchStrategy) else value
        return kwargs

    return draw_config()


def registered_quantizers():
    """Strategy for ``(name, kwargs)`` over every registered quantizer (``create_quantizer(name, **kwargs)``)."""
    from hypothesis import strategies as st

    names = list_quantizers()
    if not names:
        raise ValueError("registered_quantizers: no quantizer is registered (import quantkit.quantizers first)")
    return st.sampled_from(names).flatmap(lambda n: quantizer_configs(n).map(lambda kwargs: (n, kwargs)))

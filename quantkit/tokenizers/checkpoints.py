"""Import published tokenizer checkpoints from a local file into quantkit modules (nothing is downloaded).

    tok = import_checkpoint("vqgan_imagenet_f16_1024.ckpt", "taming")        # -> VQGAN + "vq" quantizer
    tok = import_checkpoint("vq_ds16_c2i.pt", "llamagen")                    # -> VQGAN + cosine "vq"
    tok = import_checkpoint("vae_ch160v4096z32.pth", "var")                  # -> VQGAN + "multiscale_residual"
    tok = import_checkpoint("titok_*.bin", "titok")                          # -> TiTok + cosine "vq"

Sources (key layouts in shared/reference/tokenizers_generators.md):
    taming    CompVis/taming-transformers VQModel (Lightning ``state_dict``; ``loss.*`` dropped). Same names as here.
    llamagen  FoundationVision/LlamaGen VQ_16 / VQ_8 (``model`` or ``ema``): ``conv_blocks.{l}.res`` -> ``down.{l}.block``,
              ``mid.{0,1,2}`` -> ``mid.{block_1,attn_1,block_2}``, and the decoder quirk: ``decoder.conv_blocks.{i}``
              runs lowest resolution first, so it is ``decoder.up.{L-1-i}``. Codes and inputs are l2-normalised.
    var       FoundationVision/VAR VQVAE: attention has one fused ``qkv`` conv (split into q, k, v here), 3x3
              quant / post-quant convs, and the multi-scale quantizer's ``quant_resi.qresi_ls.{i}`` (phi convs).
    titok     bytedance/1d-tokenizer TiTok with the pixel head (``decoder.ffn.0`` + ``decoder.conv_out``); the
              ``legacy_reshape`` quirk of the published L-32/B-64/S-128 encoders is reproduced when asked.
              Legacy checkpoints whose decoder emits MaskGIT-VQGAN proxy codes (``decoder.ffn.2``,
              ``pixel_decoder.*``) are refused with a message: their pixel decoder is not converted.

The one idea to hold: every mapping is written from our side, ``our key -> (source key, transform)``; so a
truncated or foreign file is reported in the source's own key names (missing, unexpected, wrong shape), and
nothing is loaded unless every key matches.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .base import Tokenizer

Transform = Callable[[Tensor], Tensor]
_IDENTITY: Transform = lambda t: t  # noqa: E731

#: VAR's scales for 256 px images (16x16 latents).
VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
SOURCES = ("taming", "llamagen", "var", "titok")


class CheckpointMismatch(ValueError):
    """A source state dict does not fit the module built for it; the message names the keys."""


# ----------------------------------------------------------------------------------------------------------------
# reading


def read_state_dict(source: str | os.PathLike | dict[str, Tensor], containers: tuple[str, ...]) -> dict[str, Tensor]:
    """A state dict from a local file (.safetensors, or a torch pickle read with weights_only=True) or a dict,
    unwrapped from the first of ``containers`` present (e.g. Lightning's "state_dict", LlamaGen's "model")."""
    if isinstance(source, dict):
        state = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} not found (quantkit only reads local files)")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointMismatch(f"could not read {str(path)!r} as a checkpoint ({type(err).__name__}: {err}); "
                                     f"is the file complete?") from err
    for key in containers:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointMismatch("the checkpoint holds no flat state dict of tensors (looked inside "
                                 f"{list(containers)})")
    return dict(state)


def _need(state: dict[str, Tensor], key: str, what: str) -> Tensor:
    if key not in state:
        raise CheckpointMismatch(f"not a {what} checkpoint: key {key!r} is missing (found e.g. "
                                 f"{sorted(state)[:5]})")
    return state[key]


def _indices(state: dict[str, Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state for m in [rx.match(k)] if m})


# ----------------------------------------------------------------------------------------------------------------
# loading through a key map


def _codebook_key(tokenizer_prefix: str, quantizer) -> str:
    """Our state-dict key of the quantizer's (K, D) codebook."""
    own = quantizer.state_dict()
    for name in ("codebook.weight", "codebook", "embedding.weight"):
        if name in own:
            return f"{tokenizer_prefix}{name}"
    shaped = [k for k, v in own.items() if tuple(v.shape) == (quantizer.codebook_size, quantizer.dim)]
    if len(shaped) != 1:
        raise CheckpointMismatch(f"cannot tell which tensor of {type(quantizer).__name__} is its codebook: {shaped}")
    return f"{tokenizer_prefix}{shaped[0]}"


def load_mapped(model: Tokenizer, state: dict[str, Tensor], mapping: Callable[[str], tuple[str, Transform] | None],
                source: str, ignore_source: Callable[[str], bool] = lambda k: False) -> Tokenizer:
    """Fills every tensor of ``model`` from ``state`` through ``mapping(our_key) -> (source_key, transform)``
    (None: keep our initial value, e.g. a quantizer's usage counters). Raises CheckpointMismatch naming the
    source keys that are missing, unexpected (not used and not ignored) or of the wrong shape."""
    own = model.state_dict()
    missing, mismatched, used, new = [], [], set(), {}
    for key, ours in own.items():
        target = mapping(key)
        if target is None:
            new[key] = ours
            continue
        skey, transform = target
        if skey not in state:
            missing.append(skey)
            continue
        used.add(skey)
        try:
            value = transform(state[skey])
        except Exception:  # a slice or reshape that does not fit
            value = None
        if value is None or tuple(value.shape) != tuple(ours.shape):
            got = tuple(state[skey].shape)
            mismatched.append(f"{skey}: file {got}, expected {tuple(ours.shape)} (for {key})")
            continue
        new[key] = value.to(ours.dtype)
    unexpected = sorted(k for k in state if k not in used and not ignore_source(k))
    if missing or unexpected or mismatched:
        def show(xs: list[str]) -> str:
            xs = sorted(set(xs))
            return "; ".join(xs[:10]) + (f" ... ({len(xs)} in all)" if len(xs) > 10 else "")
        parts = [f"missing keys: {show(missing)}" if missing else "",
                 f"unexpected keys: {show(unexpected)}" if unexpected else "",
                 f"shape mismatches: {show(mismatched)}" if mismatched else ""]
        raise CheckpointMismatch(f"{source} checkpoint does not fit {type(model).__name__} "
                                 f"{model.extra_repr()}: " + " | ".join(p for p in parts if p))
    model.load_state_dict(new, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# conv VQGAN family


def _conv_config(state: dict[str, Tensor], what: str, down: str, image_size: int) -> dict[str, Any]:
    """Architecture of a taming-style encoder from tensor shapes; ``down`` is the source's level-block pattern."""
    conv_in = _need(state, "encoder.conv_in.weight", what)
    ch, in_ch = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = _indices(state, rf"encoder\.{down}\.(\d+)\.")
    if not levels:
        raise CheckpointMismatch(f"not a {what} checkpoint: no encoder.{down}.* keys")
    ch_mult = []
    for level in levels:
        w = _need(state, f"encoder.{down}.{level}.{'res' if down == 'conv_blocks' else 'block'}.0.conv1.weight", what)
        ch_mult.append(int(w.shape[0]) // ch)
    block = "res" if down == "conv_blocks" else "block"
    num_res_blocks = len(_indices(state, rf"encoder\.{down}\.0\.{block}\.(\d+)\."))
    attn_levels = tuple(lv for lv in levels if any(k.startswith(f"encoder.{down}.{lv}.attn.") for k in state))
    mid_attn = any(k.startswith(("encoder.mid.attn_1.", "encoder.mid.1.")) for k in state)
    quant_conv = _need(state, "quant_conv.weight", what)
    return dict(image_size=image_size, channels=in_ch, ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                attn_levels=attn_levels, mid_attention=mid_attn, z_channels=int(quant_conv.shape[1]),
                embed_dim=int(quant_conv.shape[0]), quant_conv_kernel=int(quant_conv.shape[-1]), norm_groups=32,
                pixel_range=(-1.0, 1.0))


def _build_vqgan(config: dict[str, Any], quantizer: str, quantizer_kwargs: dict[str, Any]):
    from .vqgan import VQGAN, VQGANConfig

    return VQGAN(VQGANConfig.from_dict({**config, "quantizer": quantizer, "quantizer_kwargs": quantizer_kwargs}))


def import_taming_vqgan(source, image_size: int = 256) -> Tokenizer:
    """taming-transformers VQModel -> VQGAN with a "vq" quantizer (l2, gradient codebook)."""
    state = read_state_dict(source, ("state_dict",))
    cfg = _conv_config(state, "taming VQGAN", "down", image_size)
    k = int(_need(state, "quantize.embedding.weight", "taming VQGAN").shape[0])
    model = _build_vqgan(cfg, "vq", {"codebook_size": k, "metric": "l2", "ema": None})
    codebook = _codebook_key("quantizer.", model.quantizer)

    def mapping(key: str):
        if key.startswith("quantizer."):
            return ("quantize.embedding.weight", _IDENTITY) if key == codebook else None
        return key, _IDENTITY

    return load_mapped(model, state, mapping, "taming VQGAN",
                       ignore_source=lambda k: k.startswith(("loss.", "perceptual_loss.", "discriminator.")))


def import_llamagen_vq(source, image_size: int = 256, use_ema: bool = False) -> Tokenizer:
    """LlamaGen VQ_8 / VQ_16 -> VQGAN with a cosine "vq" quantizer (its codes and inputs are l2-normalised)."""
    state = read_state_dict(source, ("ema", "model") if use_ema else ("model",))
    cfg = _conv_config(state, "LlamaGen VQ", "conv_blocks", image_size)
    k = int(_need(state, "quantize.embedding.weight", "LlamaGen VQ").shape[0])
    model = _build_vqgan(cfg, "vq", {"codebook_size": k, "metric": "cosine", "ema": None})
    codebook = _codebook_key("quantizer.", model.quantizer)
    last = len(cfg["ch_mult"]) - 1
    mid = {"block_1": "0", "attn_1": "1", "block_2": "2"}

    def mapping(key: str):
        if key.startswith("quantizer."):
            return ("quantize.embedding.weight", _IDENTITY) if key == codebook else None
        s = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.conv_blocks.\1.res.", key)
        s = re.sub(r"^encoder\.down\.(\d+)\.(attn|downsample)", r"encoder.conv_blocks.\1.\2", s)
        m = re.match(r"^decoder\.up\.(\d+)\.(block|attn|upsample)(.*)$", s)
        if m:  # LlamaGen's decoder list runs lowest resolution first
            part = "res" if m.group(2) == "block" else m.group(2)
            s = f"decoder.conv_blocks.{last - int(m.group(1))}.{part}{m.group(3)}"
        s = re.sub(r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.", lambda mm: f"{mm.group(1)}.mid."
                   f"{mid[mm.group(2)]}.", s)
        return s, _IDENTITY

    return load_mapped(model, state, mapping, "LlamaGen VQ",
                       ignore_source=lambda k: k in ("quantize.codebook_used",) or k.startswith("loss."))


def import_var_vqvae(source, image_size: int = 256, patch_nums: tuple[int, ...] = VAR_PATCH_NUMS) -> Tokenizer:
    """VAR's multi-scale VQVAE -> VQGAN (3x3 quant convs) with a "multiscale_residual" quantizer."""
    state = read_state_dict(source, ("vae", "state_dict"))
    # VAR's attention is one fused qkv conv; read q's shape to recognise the architecture
    what = "VAR VQVAE"
    renamed = {re.sub(r"\.qkv\.", ".q.", k): v[: v.shape[0] // 3] for k, v in state.items() if ".qkv." in k}
    cfg = _conv_config({**state, **renamed}, what, "down", image_size)
    k = int(_need(state, "quantize.embedding.weight", what).shape[0])
    num_phi = len(_indices(state, r"quantize\.quant_resi\.qresi_ls\.(\d+)\."))
    qkw = {"codebook_size": k, "patch_nums": list(patch_nums), "num_phi": num_phi or None, "phi_ratio": 0.5}
    if num_phi == 0:
        qkw["phi_ratio"] = 0.0
    model = _build_vqgan(cfg, "multiscale_residual", qkw)
    codebook = _codebook_key("quantizer.", model.quantizer)

    def mapping(key: str):
        if key.startswith("quantizer."):
            if key == codebook:
                return "quantize.embedding.weight", _IDENTITY
            m = re.match(r"^quantizer\.phi\.(\d+)\.(weight|bias)$", key)
            return (f"quantize.quant_resi.qresi_ls.{m.group(1)}.{m.group(2)}", _IDENTITY) if m else None
        m = re.match(r"^(.*\.attn(?:_1|\.\d+))\.([qkv])\.(weight|bias)$", key)
        if m:
            part = "qkv".index(m.group(2))
            return f"{m.group(1)}.qkv.{m.group(3)}", lambda t, p=part: t.chunk(3, dim=0)[p]
        return key, _IDENTITY

    return load_mapped(model, state, mapping, what, ignore_source=lambda k: k == "quantize.ema_vocab_hit_SV")


# ----------------------------------------------------------------------------------------------------------------
# TiTok


def import_titok(source, legacy_reshape: bool = False, heads: int | None = None) -> Tokenizer:
    """bytedance/1d-tokenizer TiTok (pixel head) -> TiTok with a cosine "vq" quantizer (TiTok l2-normalises).

    legacy_reshape: True for encoders trained with ``is_legacy`` (the published L-32 / B-64 / S-128).
    heads: attention heads (not recorded in the weights; default width // 64, as every published TiTok).
    """
    from .titok import TiTok, TiTokConfig

    what = "TiTok"
    state = read_state_dict(source, ("model", "state_dict"))
    if "decoder.ffn.2.weight" in state or any(k.startswith("pixel_decoder.") for k in state):
        raise CheckpointMismatch("this TiTok checkpoint decodes to MaskGIT-VQGAN proxy codes (decoder.ffn.2, "
                                 "pixel_decoder.*); quantkit does not convert that pixel decoder. Use a TiTok "
                                 "checkpoint with the pixel head (decoder.ffn.0 + decoder.conv_out)")
    patch = _need(state, "encoder.patch_embed.weight", what)  # (W, C, p, p)
    width, channels, p = int(patch.shape[0]), int(patch.shape[1]), int(patch.shape[-1])
    grid = int(round((int(_need(state, "encoder.positional_embedding", what).shape[0]) - 1) ** 0.5))
    fc = _need(state, "encoder.transformer.0.mlp.c_fc.weight", what)
    k_codes, token_size = (int(s) for s in _need(state, "quantize.embedding.weight", what).shape)
    cfg = TiTokConfig(image_size=grid * p, channels=channels, patch_size=p, width=width,
                      depth=len(_indices(state, r"encoder\.transformer\.(\d+)\.")),
                      decoder_depth=len(_indices(state, r"decoder\.transformer\.(\d+)\.")),
                      heads=heads or max(1, width // 64), mlp_ratio=int(fc.shape[0]) / width,
                      num_latent_tokens=int(_need(state, "latent_tokens", what).shape[0]), token_size=token_size,
                      legacy_reshape=legacy_reshape, quantizer="vq",
                      quantizer_kwargs={"codebook_size": k_codes, "metric": "cosine", "ema": None})
    model = TiTok(cfg)
    codebook = _codebook_key("quantizer.", model.quantizer)

    def mapping(key: str):
        if key.startswith("quantizer."):
            return ("quantize.embedding.weight", _IDENTITY) if key == codebook else None
        return key, _IDENTITY

    return load_mapped(model, state, mapping, what)


_IMPORTERS = {"taming": import_taming_vqgan, "llamagen": import_llamagen_vq, "var": import_var_vqvae,
              "titok": import_titok}


def import_checkpoint(source, kind: str, **kwargs: Any) -> Tokenizer:
    """Imports a published checkpoint; ``kind`` is one of ``SOURCES``."""
    if kind not in _IMPORTERS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; one of {list(SOURCES)}")
    return _IMPORTERS[kind](source, **kwargs)


__all__ = ["CheckpointMismatch", "SOURCES", "VAR_PATCH_NUMS", "import_checkpoint", "import_llamagen_vq",
           "import_taming_vqgan", "import_titok", "import_var_vqvae", "load_mapped", "read_state_dict"]

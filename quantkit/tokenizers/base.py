"""The ``Tokenizer`` base class: the contract every generator in quantkit relies on.

Contract (what a generator may assume of any quantkit tokenizer)
    pixel_range      (lo, hi): images given to ``encode`` / returned by ``decode`` lie in this range
                     ((-1, 1) for the conv tokenizers, as taming/VAR/LlamaGen; (0, 1) for TiTok, as the original).
                     ``from_unit`` / ``to_unit`` convert from / to [0, 1], the range every quantkit dataset yields.
    image_shape      (C, H, W) of the images it reads and writes.
    token_shape      shape of one image's token IDs: (h, w) for a grid; (L,) for TiTok's 1D sequence;
                     (h, w, depth) for a residual quantizer (one index per depth).
    vocab_size       number of codes per position (every position and depth draws from [0, vocab_size)).
    encode(images (B, C, H, W) float in pixel_range) -> ids (B, *token_shape) int64      (no gradients)
    decode(ids (B, *token_shape) int64) -> images (B, C, H, W) float32, clamped to pixel_range
    forward(images) -> TokenizerOutput(reconstruction, indices, loss, stats)            (training)
    training_loss(images) -> ({term: scalar}, TokenizerOutput)                         (what the trainer sums)
    A trained tokenizer is loaded with ``quantkit.tokenizers.load_tokenizer(run_or_checkpoint_folder)``; its
    config.json also records token_shape, vocab_size and pixel_range. With a soft quantizer (SoftVQ), forward
    reconstructs from a mixture of codes while decode(ids) uses the chosen codes only.

With the VAR multi-scale quantizer (the quantizer has ``encode_scales``), a tokenizer also offers
    encode_scales(images) -> [ids (B, p_k, p_k) int64 for each scale k]
    decode_scales([ids per scale]) -> images
and ``token_shape`` is (L,) with L = sum of h_k * w_k, the scales' maps flattened and concatenated coarse to fine
(the quantizer's ``split_scales`` undoes it).

The continuous branch (:class:`ContinuousTokenizer`, e.g. the KL-VAE) has no quantizer: ``encode`` gives latents
(B, *latent_shape) float, scaled by a factor measured on the training set, and ``decode`` takes them back; its
``continuous`` attribute is True (False for every discrete tokenizer). See the class docstring.

The one idea to hold: a tokenizer is an encoder, any registered quantizer (by name + keywords, or an instance),
and a decoder. The quantizer sees channels-last latents (B, *grid, dim) (channels-first maps (B, dim, h, w) when
it is built ``channel_first``, as VAR's); its ``dim`` must equal the encoder's latent channels, and a mismatch is
an error that says which number to change.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..quantizers import Quantizer, create_quantizer, list_quantizers
from ..quantizers._registry import quantizer_class

__all__ = ["AutoencoderConfig", "ContinuousTokenizer", "ImageAutoencoder", "LatentOutput", "Tokenizer",
           "TokenizerConfig", "TokenizerOutput", "build_quantizer", "reconstruction_loss", "with_overrides"]


class TokenizerOutput(NamedTuple):
    """reconstruction: (B, C, H, W) in pixel_range (not clamped, so gradients flow); indices: (B, *token_shape);
    loss: the quantizer's auxiliary loss (float32 scalar); stats: detached scalars (perplexity, usage, ...)."""

    reconstruction: Tensor
    indices: Tensor
    loss: Tensor
    stats: dict[str, Tensor]


@dataclass
class AutoencoderConfig:
    """Fields every image autoencoder shares, discrete or continuous; subclasses add their architecture fields."""

    image_size: int = 16
    channels: int = 1
    pixel_range: tuple[float, float] = (-1.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pixel_range"] = list(self.pixel_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        reject_unknown_fields(cls, d)
        d = dict(d)
        if "pixel_range" in d:
            d["pixel_range"] = tuple(float(v) for v in d["pixel_range"])
        return cls(**d)


@dataclass
class TokenizerConfig(AutoencoderConfig):
    """Fields every discrete tokenizer shares: the quantizer (a registered name and its keywords)."""

    quantizer: str = "vq"
    quantizer_kwargs: dict[str, Any] = field(default_factory=lambda: {"codebook_size": 256})


def reject_unknown_fields(cls, d: dict[str, Any]) -> None:
    """Raises a ValueError naming the keys of ``d`` that are not fields of dataclass ``cls`` (a config from another
    model or version), and the fields it does have."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}; known fields: {sorted(known)}")


def with_overrides(config, overrides: dict[str, Any]):
    """``config`` with keyword overrides applied (so ``VQGAN(image_size=32)`` works)."""
    if not overrides:
        return config
    d = config.to_dict()
    d.update(overrides)
    return type(config).from_dict(d)


def _dataclass_kwargs(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turns dict values into the dataclass a constructor annotates (e.g. VQ's ``dead_code={"threshold": 1}`` ->
    ``DeadCodeConfig(threshold=1)``), so JSON configs can reach every quantizer option."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: pass the keywords through unchanged
        return kwargs
    out = dict(kwargs)
    for name, value in kwargs.items():
        if not isinstance(value, dict) or name not in hints:
            continue
        hint = hints[name]
        options = typing.get_args(hint) or (hint,)
        targets = [t for t in options if dataclasses.is_dataclass(t)]
        if targets and dict not in options:
            out[name] = targets[0](**value)
    return out


def build_quantizer(name_or_module: str | Quantizer, kwargs: dict[str, Any], dim: int, owner: str) -> Quantizer:
    """A quantizer for ``dim``-channel latents: a registered name + keywords (``dim`` is filled in), or an instance.

    Raises ValueError naming both numbers when the quantizer's ``dim`` differs from ``dim``.
    """
    if isinstance(name_or_module, Quantizer):
        quantizer = name_or_module
    else:
        if name_or_module not in list_quantizers():
            raise ValueError(f"{owner}: unknown quantizer {name_or_module!r}; registered: {list_quantizers()}")
        kwargs = dict(kwargs)
        if "dim" in kwargs and kwargs["dim"] != dim:
            raise ValueError(f"{owner}: quantizer {name_or_module!r} has dim={kwargs['dim']} but the encoder produces "
                             f"{dim}-channel latents; drop 'dim' from the quantizer keywords or set the tokenizer's "
                             f"embed_dim to {kwargs['dim']}")
        kwargs["dim"] = dim
        cls = quantizer_class(name_or_module)
        kwargs = _dataclass_kwargs(cls, kwargs)
        params = inspect.signature(cls).parameters
        if "channel_first" in params:
            kwargs.setdefault("channel_first", False)
        try:
            quantizer = create_quantizer(name_or_module, **kwargs)
        except TypeError as err:
            raise ValueError(f"{owner}: quantizer {name_or_module!r} does not take these keywords ({err}); its "
                             f"signature is {inspect.signature(cls)}") from err
    if quantizer.dim != dim:
        raise ValueError(f"{owner}: the quantizer has dim={quantizer.dim} but the encoder produces {dim}-channel "
                         f"latents; build the quantizer with dim={dim} or set the tokenizer's embed_dim to "
                         f"{quantizer.dim}")
    return quantizer


def reconstruction_loss(reconstruction: Tensor, images: Tensor, kind: str = "l1") -> Tensor:
    """Per-pixel mean |x_hat - x| ("l1") or (x_hat - x)^2 ("l2")."""
    if kind == "l1":
        return (reconstruction - images).abs().mean()
    if kind == "l2":
        return (reconstruction - images).pow(2).mean()
    raise ValueError(f"recon_loss must be 'l1' or 'l2', got {kind!r}")


class ImageAutoencoder(nn.Module):
    """What discrete and continuous tokenizers share: the pixel range, the image shape and checks, and the
    encoder / decoder pair.

    Subclasses implement
        encode_latents(images) -> z (B, *grid, dim)        channels-last continuous latents
        decode_latents(z (B, *grid, dim)) -> images (B, C, H, W)
        latent_grid: tuple[int, ...]                       the grid of one image's latents
    """

    #: Name in the tokenizer registry (set by ``register_tokenizer``).
    registry_name: str = ""
    config_class = AutoencoderConfig
    #: False: images <-> token IDs (:class:`Tokenizer`); True: images <-> latents (:class:`ContinuousTokenizer`).
    continuous: bool = False

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        lo, hi = config.pixel_range
        if not lo < hi:
            raise ValueError(f"{type(self).__name__}: pixel_range must be (lo, hi) with lo < hi, got {config.pixel_range}")
        self.config = config

    latent_grid: tuple[int, ...] = ()

    def encode_latents(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def decode_latents(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def last_layer(self) -> Tensor | None:
        """Weight of the decoder's last layer (VQGAN's adaptive GAN weight differentiates through it)."""
        return None

    @property
    def pixel_range(self) -> tuple[float, float]:
        return tuple(self.config.pixel_range)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.channels, self.config.image_size, self.config.image_size)

    def from_unit(self, images01: Tensor) -> Tensor:
        """[0, 1] images -> pixel_range."""
        lo, hi = self.pixel_range
        return images01 * (hi - lo) + lo

    def to_unit(self, images: Tensor) -> Tensor:
        """pixel_range images -> [0, 1]."""
        lo, hi = self.pixel_range
        return (images - lo) / (hi - lo)

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{type(self).__name__}: images must have shape (B, {', '.join(map(str, self.image_shape))})"
                             f", got {got}")
        if not images.is_floating_point():
            raise ValueError(f"{type(self).__name__}: images must be float in pixel_range {self.pixel_range}, got "
                             f"{images.dtype}")


class Tokenizer(ImageAutoencoder):
    """Base class: images <-> token IDs through ``encode_latents`` -> quantizer -> ``decode_latents``."""

    config_class = TokenizerConfig

    def __init__(self, config: TokenizerConfig, quantizer: Quantizer):
        super().__init__(config)
        if quantizer.registry_name and quantizer.registry_name != config.quantizer:
            config.quantizer = quantizer.registry_name  # an instance was passed: record what it is
        self.quantizer = quantizer

    # ------------------------------------------------------------------------------------------------------------
    # contract

    @property
    def vocab_size(self) -> int:
        return int(self.quantizer.codebook_size)

    @property
    def multiscale(self) -> bool:
        return hasattr(self.quantizer, "encode_scales")

    @property
    def token_shape(self) -> tuple[int, ...]:
        if self.multiscale:
            return (int(self.quantizer.num_tokens),)
        depth = self.quantizer.num_indices
        return tuple(self.latent_grid) if depth == 1 else (*self.latent_grid, depth)

    def _check_quantizer_grid(self) -> None:
        """A multi-scale quantizer's last scale must be the latent grid."""
        if self.multiscale and tuple(self.quantizer.sizes[-1]) != tuple(self.latent_grid):
            raise ValueError(f"{type(self).__name__}: the multi-scale quantizer's last scale {self.quantizer.sizes[-1]} "
                             f"must equal the latent grid {tuple(self.latent_grid)}; end patch_nums with "
                             f"{self.latent_grid[0]}")

    # the quantizer sees channels-last latents, or channels-first maps when it is built channel_first (VAR)
    def _quantizer_layout(self, z: Tensor) -> Tensor:
        return z.movedim(-1, 1) if self.quantizer.channel_first else z

    def _latent_layout(self, q: Tensor) -> Tensor:
        return q.movedim(1, -1) if self.quantizer.channel_first else q

    def _check_ids(self, ids: Tensor) -> None:
        if not isinstance(ids, Tensor) or ids.dtype != torch.int64:
            raise ValueError(f"{type(self).__name__}: token ids must be an int64 tensor")
        if tuple(ids.shape[1:]) != self.token_shape:
            raise ValueError(f"{type(self).__name__}: token ids must have shape (B, {', '.join(map(str, self.token_shape))}), "
                             f"got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"{type(self).__name__}: token ids must lie in [0, {self.vocab_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    def forward(self, images: Tensor) -> TokenizerOutput:
        self._check_images(images)
        z = self.encode_latents(images)  # (B, *grid, dim)
        q = self.quantizer(self._quantizer_layout(z))
        return TokenizerOutput(self.decode_latents(self._latent_layout(q.quantized)), q.indices, q.loss, q.stats)

    def training_loss(self, images: Tensor, recon_loss: str = "l1") -> tuple[dict[str, Tensor], TokenizerOutput]:
        """Loss terms (summed by the trainer) and the forward output: reconstruction ("l1" or "l2") + quantizer."""
        out = self(images)
        return {"recon": reconstruction_loss(out.reconstruction, images, recon_loss), "quantizer": out.loss}, out

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) in pixel_range -> token ids (B, *token_shape) int64."""
        self._check_images(images)
        return self.quantizer.encode(self._quantizer_layout(self.encode_latents(images)))

    @torch.no_grad()
    def decode(self, ids: Tensor) -> Tensor:
        """token ids (B, *token_shape) int64 -> images (B, C, H, W) float32 clamped to pixel_range."""
        self._check_ids(ids)
        z = self._latent_layout(self.quantizer.decode(ids))  # (B, *grid, dim)
        return self.decode_latents(z).float().clamp(*self.pixel_range)

    # ------------------------------------------------------------------------------------------------------------
    # VAR: one token map per scale

    @torch.no_grad()
    def encode_scales(self, images: Tensor) -> list[Tensor]:
        """images -> [ids (B, p_k, p_k) int64 per scale, coarse to fine] (multi-scale quantizers only)."""
        self._require_multiscale("encode_scales")
        self._check_images(images)
        return list(self.quantizer.encode_scales(self._quantizer_layout(self.encode_latents(images))))

    @torch.no_grad()
    def decode_scales(self, ids_per_scale: list[Tensor]) -> Tensor:
        """[ids (B, p_k, p_k) per scale] (a prefix of the scales is allowed) -> images clamped to pixel_range."""
        self._require_multiscale("decode_scales")
        z = self._latent_layout(self.quantizer.decode_scales(list(ids_per_scale)))
        return self.decode_latents(z).float().clamp(*self.pixel_range)

    def _require_multiscale(self, what: str) -> None:
        if not self.multiscale:
            raise ValueError(f"{type(self).__name__}.{what} needs a multi-scale quantizer (one with encode_scales, "
                             f"e.g. 'multiscale_residual'); this one is {type(self.quantizer).__name__}")

    def extra_repr(self) -> str:
        return (f"image_shape={self.image_shape}, token_shape={self.token_shape}, vocab_size={self.vocab_size}, "
                f"pixel_range={self.pixel_range}")


# ----------------------------------------------------------------------------------------------------------------
# the continuous branch: images <-> latents, no quantizer


class LatentOutput(NamedTuple):
    """reconstruction: (B, C, H, W) in pixel_range (not clamped); latents: (B, *latent_shape) what the decoder saw
    (a posterior sample in training), *unscaled*; loss: the bottleneck's regulariser, weighted (KL for a KL-VAE;
    float32 scalar); stats: detached scalars (KL per dim, active units, ...)."""

    reconstruction: Tensor
    latents: Tensor
    loss: Tensor
    stats: dict[str, Tensor]


class ContinuousTokenizer(ImageAutoencoder):
    """Base class: images <-> continuous latents through ``encode_latents`` / ``decode_latents``, no quantizer.

    Contract (what a continuous generator may assume)
        latent_shape     (*latent_grid, latent_dim): one image's latents, channels last ((h, w, c) for a grid).
        latent_scale     s_f, a buffer: the generator sees z * s_f, the decoder gets latents / s_f. Measured once
                         on the training set by :meth:`measure_latent_scale` (s_f = 1 / std of all latent elements,
                         the ``scale_by_std`` of Rombach et al. 2022), saved with the weights.
        encode(images (B, C, H, W) in pixel_range) -> latents (B, *latent_shape) float32, = s_f * mode   (no grad)
        decode(latents (B, *latent_shape)) -> images (B, C, H, W) float32 clamped to pixel_range        (no grad)
        forward(images) -> LatentOutput(reconstruction, latents, loss, stats)                             (training)
        training_loss(images) -> ({term: scalar}, LatentOutput)
    ``encode``/``decode`` mirror the discrete tokenizers' ``encode``/``decode`` of token IDs, so evaluation code
    that only round-trips images works on both. Any quantizer-free autoencoder plugs in by implementing
    ``encode_latents``/``decode_latents`` (and ``encode_posterior`` for a stochastic bottleneck).
    """

    continuous = True
    #: channels of one latent position (set by the subclass)
    latent_dim: int = 0

    def __init__(self, config: AutoencoderConfig):
        super().__init__(config)
        self.register_buffer("latent_scale", torch.ones((), dtype=torch.float32))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (*self.latent_grid, self.latent_dim)

    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Training-time bottleneck: (latents (B, *latent_shape) unscaled, weighted regulariser, stats). A
        deterministic autoencoder returns its latents, 0 and no stats."""
        return self.encode_latents(images), images.new_zeros(()), {}

    def forward(self, images: Tensor) -> LatentOutput:
        self._check_images(images)
        z, loss, stats = self.encode_posterior(images)
        return LatentOutput(self.decode_latents(z), z, loss, stats)

    def training_loss(self, images: Tensor, recon_loss: str = "l1") -> tuple[dict[str, Tensor], LatentOutput]:
        """Loss terms (summed by the trainer) and the forward output: reconstruction ("l1" or "l2") + regulariser."""
        out = self(images)
        return {"recon": reconstruction_loss(out.reconstruction, images, recon_loss), "kl": out.loss}, out

    def check_latents(self, latents: Tensor) -> None:
        if not isinstance(latents, Tensor) or not latents.is_floating_point() \
                or tuple(latents.shape[1:]) != self.latent_shape:
            got = (f"{tuple(latents.shape)} {latents.dtype}" if isinstance(latents, Tensor)
                   else type(latents).__name__)
            raise ValueError(f"{type(self).__name__}: latents must be a float tensor of shape "
                             f"(B, {', '.join(map(str, self.latent_shape))}), got {got}")

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) in pixel_range -> latents (B, *latent_shape) float32, scaled by latent_scale."""
        self._check_images(images)
        return (self.encode_latents(images) * self.latent_scale).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """latents (B, *latent_shape) (scaled, as :meth:`encode` gives) -> images clamped to pixel_range."""
        self.check_latents(latents)
        return self.decode_latents(latents / self.latent_scale).float().clamp(*self.pixel_range)

    @torch.no_grad()
    def measure_latent_scale(self, images01_batches) -> float:
        """Sets latent_scale = 1 / std of every element of ``encode_latents`` over the given [0, 1] image batches
        (iterate the whole training set once); returns it."""
        total, total_sq, count = 0.0, 0.0, 0
        for images01 in images01_batches:
            z = self.encode_latents(self.from_unit(images01.to(self.latent_scale.device))).double()
            total, total_sq, count = total + float(z.sum()), total_sq + float(z.pow(2).sum()), count + z.numel()
        if count < 2:
            raise ValueError("measure_latent_scale: need at least one batch of images")
        var = (total_sq - total * total / count) / (count - 1)
        if not var > 0:
            raise ValueError("measure_latent_scale: the latents are constant (std 0); is the encoder trained?")
        self.latent_scale.fill_(1.0 / var ** 0.5)
        return float(self.latent_scale)

    def extra_repr(self) -> str:
        return (f"image_shape={self.image_shape}, latent_shape={self.latent_shape}, "
                f"latent_scale={float(self.latent_scale):.4f}, pixel_range={self.pixel_range}")

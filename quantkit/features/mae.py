"""MAE: a small ViT trained to reconstruct masked image patches, quantkit's in-house "pretrained" encoder.

Paper: He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", https://arxiv.org/abs/2111.06377
(reference code facebookresearch/mae: ``models_mae.py``).

- Patchify (B, C, H, W) -> N = (H/p)(W/p) patches, linear embedding + fixed 2D sin-cos positions.
- Random masking: per image a random permutation; the first ``N - round(N * mask_ratio)`` patches stay visible
  (75% masked by default), the same count for every image so the batch stays rectangular.
- The encoder (a ViT) sees the visible patches only; a lightweight decoder (narrower, shallower) gets the encoded
  visible patches plus a shared learned mask token at every masked position and predicts every patch's pixels.
- Loss: mean squared error on the masked patches only, against per-patch normalized pixels (each target patch
  minus its mean, over its standard deviation: the paper's ``norm_pix_loss``, which gave better features).

The one idea to hold: masked patches are dropped *before* the encoder (a gather of the visible ones), so the
encoder never sees them and runs on a quarter of the sequence; downstream, :meth:`MAE.features` runs the same
encoder on all N patches and returns (B, N, width), the patch feature encoder interface of
:mod:`quantkit.features.encoder`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from ..generators.transformer import Transformer, TransformerConfig

__all__ = ["MAE", "MAEConfig", "MAEOutput", "sincos_positions"]


@dataclass
class MAEConfig:
    """image_size / channels: the images it reads ([0, 1]); patch_size p; width / depth / heads: the encoder ViT;
    decoder_*: the lightweight decoder; mask_ratio: fraction of patches masked in training; norm_pix_loss:
    per-patch normalized pixel targets."""

    image_size: int = 16
    channels: int = 1
    patch_size: int = 4
    width: int = 64
    depth: int = 4
    heads: int = 4
    decoder_width: int = 32
    decoder_depth: int = 1
    decoder_heads: int = 2
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True

    def __post_init__(self):
        for name in ("image_size", "channels", "patch_size", "width", "depth", "heads", "decoder_width",
                     "decoder_depth", "decoder_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MAEConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"MAEConfig: image_size {self.image_size} is not divisible by patch_size "
                             f"{self.patch_size}")
        if not isinstance(self.mask_ratio, (int, float)) or not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"MAEConfig.mask_ratio must be in (0, 1), got {self.mask_ratio!r}")
        n = self.num_patches
        if not 1 <= round(n * self.mask_ratio) <= n - 1:
            raise ValueError(f"MAEConfig: mask_ratio {self.mask_ratio} of {n} patches masks "
                             f"{round(n * self.mask_ratio)}; at least one patch must be masked and one visible")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MAEConfig":
        from ..tokenizers.base import reject_unknown_fields

        reject_unknown_fields(cls, d)
        return cls(**d)


class MAEOutput(NamedTuple):
    """loss: scalar, masked patches only; pred: (B, N, p*p*C) every patch's prediction (normalized-pixel space
    when norm_pix_loss); mask: (B, N) bool, True where a patch was masked; ids_keep: (B, N_visible) the visible
    patches' indices, in the order the encoder saw them."""

    loss: Tensor
    pred: Tensor
    mask: Tensor
    ids_keep: Tensor


def sincos_positions(grid: int, dim: int) -> Tensor:
    """Fixed 2D sin-cos position embeddings (grid * grid, dim), half the channels for each axis (MAE's)."""
    if dim % 4:
        raise ValueError(f"sincos_positions: dim must be divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")

    def axis(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega  # (grid^2, dim/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (grid^2, dim/2)

    return torch.cat([axis(ys), axis(xs)], dim=1).float()  # (grid^2, dim)


class _Features(nn.Module):
    """``images -> MAE.features(images)``: the MAE as a patch feature encoder module (shares its weights)."""

    def __init__(self, mae: "MAE"):
        super().__init__()
        self.mae = mae

    def forward(self, images: Tensor) -> Tensor:
        return self.mae.features(images)


class MAE(nn.Module):
    """Masked autoencoder over (B, C, H, W) images in [0, 1]; see the module docstring."""

    def __init__(self, config: MAEConfig | None = None, **overrides: Any):
        super().__init__()
        c = config or MAEConfig()
        if overrides:
            c = MAEConfig.from_dict({**c.to_dict(), **overrides})
        self.config = c
        for width, heads, what in ((c.width, c.heads, ""), (c.decoder_width, c.decoder_heads, "decoder_")):
            if width % heads or width % 4:
                raise ValueError(f"MAE: {what}width {width} must be divisible by {what}heads {heads} and by 4")
        p, grid, patch_dim = c.patch_size, c.image_size // c.patch_size, c.patch_size ** 2 * c.channels
        self.grid, self.num_patches, self.patch_dim = grid, grid * grid, patch_dim
        self.patch_embed = nn.Linear(patch_dim, c.width)
        self.register_buffer("pos_embed", sincos_positions(grid, c.width)[None], persistent=False)  # (1, N, W)
        self.encoder = Transformer(TransformerConfig(c.width, c.depth, c.heads, c.mlp_ratio))
        self.decoder_embed = nn.Linear(c.width, c.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos_embed", sincos_positions(grid, c.decoder_width)[None], persistent=False)
        self.decoder = Transformer(TransformerConfig(c.decoder_width, c.decoder_depth, c.decoder_heads, c.mlp_ratio))
        self.decoder_pred = nn.Linear(c.decoder_width, patch_dim)
        nn.init.xavier_uniform_(self.patch_embed.weight)  # as a conv patch embedding in MAE
        nn.init.zeros_(self.patch_embed.bias)

    # ------------------------------------------------------------------------------------------------------------

    def patchify(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), patches in raster order."""
        p = self.config.patch_size
        return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p = self.config.patch_size
        return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=self.grid, p1=p, p2=p)

    @property
    def num_visible(self) -> int:
        return self.num_patches - round(self.num_patches * self.config.mask_ratio)

    def random_masking(self, batch: int, device: torch.device | str = "cpu",
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """ids_keep (B, N_visible) int64 and mask (B, N) bool (True = masked): one random permutation per image,
        exactly ``round(N * mask_ratio)`` patches masked in every image."""
        noise = torch.rand(batch, self.num_patches, generator=generator).to(device)  # (B, N)
        ids_keep = noise.argsort(dim=1)[:, :self.num_visible]  # (B, N_visible)
        mask = torch.ones(batch, self.num_patches, dtype=torch.bool, device=device)
        mask.scatter_(1, ids_keep, False)
        return ids_keep, mask

    def _check_images(self, images: Tensor) -> None:
        c = self.config
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point() \
                or tuple(images.shape[1:]) != (c.channels, c.image_size, c.image_size):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"MAE: images must be a float tensor of shape (B, {c.channels}, {c.image_size}, "
                             f"{c.image_size}) in [0, 1], got {got}")

    def _embed(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, N, W) patch embeddings + positions (inputs centred to [-1, 1])."""
        return self.patch_embed(self.patchify(images * 2 - 1)) + self.pos_embed

    def encode_visible(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        """The encoder on the visible patches only: (B, C, H, W), ids_keep (B, V) -> (B, V, width). Masked patches
        are removed before the first block, so nothing the encoder computes depends on them."""
        x = self._embed(images)  # (B, N, W)
        x = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, V, W)
        return self.encoder(x)

    def decode(self, latent: Tensor, ids_keep: Tensor) -> Tensor:
        """Encoded visible patches (B, V, width) -> predicted pixels of every patch (B, N, p*p*C)."""
        x = self.decoder_embed(latent)  # (B, V, Wd)
        b, v, wd = x.shape
        full = self.mask_token.expand(b, self.num_patches, wd).clone()  # (B, N, Wd): mask tokens everywhere
        full = full.scatter(1, ids_keep[..., None].expand(-1, -1, wd), x)  # visible patches back in place
        return self.decoder_pred(self.decoder(full + self.decoder_pos_embed))

    def targets(self, images: Tensor) -> Tensor:
        """What the decoder predicts: (B, N, p*p*C) pixels, per-patch normalized when norm_pix_loss."""
        target = self.patchify(images)
        if self.config.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> MAEOutput:
        """One training forward: mask, encode the visible patches, decode all, MSE on the masked ones."""
        self._check_images(images)
        ids_keep, mask = self.random_masking(images.shape[0], images.device, generator)
        pred = self.decode(self.encode_visible(images, ids_keep), ids_keep)  # (B, N, p*p*C)
        per_patch = (pred - self.targets(images)).square().mean(-1)  # (B, N)
        loss = (per_patch * mask).sum() / mask.sum()
        return MAEOutput(loss, pred, mask, ids_keep)

    def features(self, images: Tensor) -> Tensor:
        """Patch features: the encoder on all N patches, (B, C, H, W) in [0, 1] -> (B, N, width)."""
        self._check_images(images)
        return self.encoder(self._embed(images))

    def feature_module(self) -> nn.Module:
        """A module whose forward is :meth:`features` (for :class:`~quantkit.features.encoder.FeatureEncoder`)."""
        return _Features(self)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(masked input with masked patches zeroed, reconstruction) as [0, 1] images, for pictures. With
        norm_pix_loss each predicted patch is given the true patch's mean and std (MAE's visualization)."""
        out = self(images, generator)
        pred = out.pred
        if self.config.norm_pix_loss:
            target = self.patchify(images)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        patches = self.patchify(images)
        masked = patches.masked_fill(out.mask[..., None], 0.0)
        mixed = torch.where(out.mask[..., None], pred, patches)
        return self.unpatchify(masked), self.unpatchify(mixed).clamp(0, 1)

    def extra_repr(self) -> str:
        c = self.config
        return (f"image=({c.channels}, {c.image_size}, {c.image_size}), patches={self.num_patches}, "
                f"mask_ratio={c.mask_ratio}, visible={self.num_visible}")

"""The patch feature encoder interface: any module mapping images (B, C, H, W) in [0, 1] to patch features
(B, N, F).

Methods that ask for "pretrained features" (SoftVQ-VAE's representation alignment, VQGAN-LC's k-means codebook)
take a :class:`FeatureEncoder`, never a particular model: quantkit's own MAE (:mod:`quantkit.features.mae`) or a
user's timm / open_clip model wrapped so that its forward returns (B, N, F) (drop a class token first).

The one idea to hold: the wrapper runs the module once on a probe batch when it is built, so a module with the wrong
output shape is refused at once with a message naming the expected shape, not deep inside a training step; after
that every call is frozen (eval mode, no autograd), so nothing downstream can train the encoder.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FeatureEncoder", "as_feature_encoder"]

_PROBE_BATCH = 2


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)} ({out.dtype})"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} items"
    return f"a {type(out).__name__}"


class FeatureEncoder:
    """A frozen patch feature encoder: ``encoder(images (B, C, H, W) in [0, 1]) -> (B, N, F) float``.

    Not an ``nn.Module`` on purpose: a model that holds one (SoftVQ-VAE) neither trains it nor saves it.

    Args:
        module: any callable module; its forward gets (B, C, H, W) images in [0, 1] (normalize inside it if it
            expects another range) and must return one float tensor (B, N, F).
        image_shape: (C, H, W) of the images it will be given.
        num_patches / feature_dim: when given, N / F must equal them.
        name: how error messages call it.

    Raises ValueError naming the expected shape when the probe output is anything but (B, N, F).
    """

    def __init__(self, module: nn.Module, image_shape: tuple[int, int, int], num_patches: int | None = None,
                 feature_dim: int | None = None, name: str | None = None):
        if not callable(module):
            raise ValueError(f"feature encoder: expected a module mapping images (B, C, H, W) to patch features "
                             f"(B, N, F), got {type(module).__name__}")
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"feature encoder: image_shape must be (C, H, W), got {image_shape}")
        self.module, self.image_shape = module, image_shape
        self.name = name or type(module).__name__
        if isinstance(module, nn.Module):
            module.eval()
        self._device = _module_device(module)
        c, h, w = image_shape
        probe = torch.full((_PROBE_BATCH, c, h, w), 0.5, device=self._device)
        out = self._raw(probe)
        n = "N" if num_patches is None else num_patches
        f = "F" if feature_dim is None else feature_dim
        expected = f"(B, N, F) = ({_PROBE_BATCH}, {n}, {f}) for images of shape ({_PROBE_BATCH}, {c}, {h}, {w})"
        if not isinstance(out, Tensor) or out.dim() != 3 or out.shape[0] != _PROBE_BATCH \
                or not out.is_floating_point() or min(out.shape) < 1:
            raise ValueError(f"feature encoder {self.name}: expected patch features of shape {expected}, got "
                             f"{_describe(out)}; wrap the model so its forward returns (B, N, F) (e.g. drop the "
                             f"class token of a ViT's forward_features)")
        if (num_patches is not None and out.shape[1] != num_patches) or \
                (feature_dim is not None and out.shape[2] != feature_dim):
            raise ValueError(f"feature encoder {self.name}: expected patch features of shape {expected}, got "
                             f"{tuple(out.shape)}")
        self.num_patches, self.feature_dim = int(out.shape[1]), int(out.shape[2])

    def _raw(self, images: Tensor) -> Any:
        with torch.no_grad():
            return self.module(images)

    def __call__(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) in [0, 1] -> features (B, N, F) float32 on the images' device, without gradient."""
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"feature encoder {self.name}: images must have shape (B, "
                             f"{', '.join(map(str, self.image_shape))}), got {got}")
        out = self._raw(images.to(self._device, torch.float32))
        if not isinstance(out, Tensor) or tuple(out.shape) != (images.shape[0], self.num_patches, self.feature_dim):
            raise ValueError(f"feature encoder {self.name}: expected patch features of shape (B, N, F) = "
                             f"({images.shape[0]}, {self.num_patches}, {self.feature_dim}), got {_describe(out)}")
        return out.detach().float().to(images.device)

    def to(self, device: torch.device | str) -> "FeatureEncoder":
        """Moves the wrapped module (when it is an nn.Module) to ``device``."""
        if isinstance(self.module, nn.Module):
            self.module.to(device)
            self._device = torch.device(device)
        return self

    def __repr__(self) -> str:
        return (f"FeatureEncoder({self.name}, image_shape={self.image_shape}, num_patches={self.num_patches}, "
                f"feature_dim={self.feature_dim})")


def _module_device(module: Any) -> torch.device:
    if isinstance(module, nn.Module):
        for t in module.parameters():
            return t.device
        for t in module.buffers():
            return t.device
    return torch.device("cpu")


def as_feature_encoder(encoder: Any, image_shape: tuple[int, int, int], **kwargs: Any) -> FeatureEncoder:
    """``encoder`` as a :class:`FeatureEncoder`: a FeatureEncoder (checked against ``image_shape``), a quantkit MAE
    (its :meth:`~quantkit.features.mae.MAE.features`), a path to a quantkit features run, or any module."""
    from .mae import MAE

    if isinstance(encoder, (str, bytes)) or hasattr(encoder, "__fspath__"):
        from .train import load_mae

        encoder = load_mae(encoder)
    if isinstance(encoder, FeatureEncoder):
        if encoder.image_shape != tuple(image_shape):
            raise ValueError(f"feature encoder {encoder.name}: it reads images {encoder.image_shape}, expected "
                             f"{tuple(image_shape)}")
        return encoder
    if isinstance(encoder, MAE):
        return FeatureEncoder(encoder.feature_module(), image_shape, name="MAE", **kwargs)
    return FeatureEncoder(encoder, image_shape, **kwargs)

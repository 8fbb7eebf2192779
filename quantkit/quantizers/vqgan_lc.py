"""VQGAN-LC: a large frozen codebook of clustered features, with only a projector trained
(Zhu et al. 2024, "Scaling the Codebook Size of VQGAN to 100,000 with a Utilization Rate of 99%",
arXiv:2406.11837).

The codebook E (K, F) holds k-means centroids of pretrained image features (CLIP patch tokens in the paper) and is
never trained; a projector P: F -> dim (a linear layer) maps it into the latent space, and latents z are quantized
against E' = P(E). Because every code moves whenever P moves, the whole codebook stays in use (the paper's 99%
utilization at 100k codes), instead of a few codes drifting towards the encoder as in a plain VQ.

Loss (the paper's): ``commitment_weight * ||z - sg(q)||^2 + projector_weight * ||sg(z) - q||^2``, q = P(E[i]); the
second term is what trains P.

Projector initialization from data (``init_from_data``, default on): a random P maps E to a cloud whose centre and
spread have nothing to do with the encoder's latents; when that cloud is far from them or much smaller, one
projected code is the nearest for every latent, only that row gets the projector gradient, and the codebook
collapses to one code. So, as the paper's projector is meant to do, the first training batch fits P to the
latent statistics: per latent dimension, P is rescaled so the projected codebook has the latents' standard
deviation and its bias set so it has their mean (an affine map of P, so E' stays a linear image of E).

Codebooks from pretrained features in one call (:meth:`VQGANLCQuantizer.from_encoder`): run any patch feature
encoder (:mod:`quantkit.features`: quantkit's MAE, or a user's model mapping (B, C, H, W) to (B, N, F)) over a
seeded sample of a dataset's images, draw patch features from them, and cluster those with faiss k-means (a tree
of small k-means above a few hundred codes, so 100,000 codes take minutes on a CPU), with progress on stderr.

The one idea to hold: the token id is a row of the frozen feature codebook; the projected codebook is recomputed
from P on every forward (K x F x dim, cheap), searched with ``nearest_codeword``, and only the chosen rows are
projected again with gradient, so nothing of size N x K is built.
"""
from __future__ import annotations

import os
import sys
import time

import torch
from torch import Tensor, nn

from ..ops import nearest_codeword
from ._registry import register_quantizer
from .base import Quantizer
from .codebook import _all_reduce_, faiss_kmeans
from .gradients import straight_through
from .vq import masked_mse

__all__ = ["VQGANLCQuantizer", "sample_patch_features"]


@register_quantizer("vqgan_lc", example=dict(dim=8, codebook_size=64, feature_dim=16))
class VQGANLCQuantizer(Quantizer):
    """Frozen feature codebook (K, feature_dim) + trained linear projector to ``dim``.

    Args:
        dim: latent size (the paper uses 8).
        codebook_size: number of codes K.
        feature_dim: size of the frozen features (768 for CLIP ViT-L/14).
        features_codebook: the (K, feature_dim) frozen codebook, or the path of a file written by
            :meth:`save_codebook` (so a JSON tokenizer config can name it); default: a fixed random normal one (the
            paper's "random fixed" baseline) -- build from real features with :meth:`from_features` /
            :meth:`from_encoder`.
        commitment_weight: weight of the encoder term (paper: 1.0).
        projector_weight: weight of the term that trains the projector (paper: 0.33).
        seed: seed of the random codebook when ``features_codebook`` is None.
        init_from_data: on the first training batch, fit the projector so the projected codebook has the
            latents' per-dimension mean and standard deviation (see the module docstring).
        channel_first: x is (B, dim, *spatial).
    """

    def __init__(self, dim: int, codebook_size: int, feature_dim: int | None = None, *,
                 features_codebook: Tensor | str | None = None, commitment_weight: float = 1.0,
                 projector_weight: float = 0.33, seed: int = 0, init_from_data: bool = True,
                 channel_first: bool = False):
        super().__init__(dim, codebook_size, channel_first)
        if isinstance(features_codebook, (str, os.PathLike)):  # a file from save_codebook (JSON configs use this)
            features_codebook = load_codebook(features_codebook)
        if features_codebook is not None:
            if not isinstance(features_codebook, Tensor) or features_codebook.dim() != 2 \
                    or features_codebook.shape[0] != codebook_size or not features_codebook.is_floating_point():
                shape = tuple(features_codebook.shape) if isinstance(features_codebook, Tensor) else None
                raise ValueError(f"VQGANLCQuantizer: features_codebook must be a float tensor of shape "
                                 f"({codebook_size}, feature_dim), got {shape}")
            if feature_dim is not None and feature_dim != features_codebook.shape[1]:
                raise ValueError(f"VQGANLCQuantizer: feature_dim={feature_dim} disagrees with features_codebook's "
                                 f"{features_codebook.shape[1]} columns")
            if not bool(torch.isfinite(features_codebook).all()):
                raise ValueError("VQGANLCQuantizer: features_codebook contains NaN or inf")
            feature_dim = features_codebook.shape[1]
            frozen = features_codebook.detach().float().clone()
        else:
            if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
                raise ValueError(f"VQGANLCQuantizer: feature_dim must be a positive int, got {feature_dim!r}")
            frozen = torch.randn(codebook_size, feature_dim, generator=torch.Generator().manual_seed(seed))
        for name, value in (("commitment_weight", commitment_weight), ("projector_weight", projector_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"VQGANLCQuantizer: {name} must be a finite number >= 0, got {value!r}")
        self.feature_dim = feature_dim
        self.commitment_weight, self.projector_weight = float(commitment_weight), float(projector_weight)
        self.register_buffer("features_codebook", frozen)  # (K, F): a buffer, so it is saved but never trained
        self.projector = nn.Linear(feature_dim, dim)
        nn.init.normal_(self.projector.weight, std=dim ** -0.5)  # the paper's init
        nn.init.zeros_(self.projector.bias)
        # True once the projector matches the latent statistics (or when that is not wanted)
        self.register_buffer("initialized", torch.tensor(not init_from_data))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints written before ``initialized`` existed hold a trained projector: mark it initialized
        state_dict.setdefault(prefix + "initialized", torch.tensor(True))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def _init_projector(self, z: Tensor) -> None:
        """Affine refit of P so that P(E) has the per-dimension mean and std of the latents z (n, dim)."""
        z = z.detach().double()  # float64 sums: the variance is a difference of two of them
        # count, sum and sum of squares over every rank, so the projector is the same on all of them
        stats = _all_reduce_(torch.cat([z.new_tensor([z.shape[0]]), z.sum(0), z.square().sum(0)]))
        n, total, total_sq = stats[0], stats[1:1 + self.dim], stats[1 + self.dim:]
        if float(n) < 2:
            return
        z_mean = total / n
        z_std = ((total_sq - n * z_mean.square()).clamp_min(0) / (n - 1)).sqrt()
        z_mean, z_std = z_mean.float(), z_std.float()
        projected = self.projected_codebook().float()  # (K, dim)
        scale = z_std / projected.std(0).clamp_min(1e-12)  # (dim,)
        self.projector.weight.mul_(scale[:, None].to(self.projector.weight.dtype))
        self.projector.bias.copy_(z_mean - (projected.mean(0) - self.projector.bias.float()) * scale)
        self.initialized.fill_(True)

    @classmethod
    def from_features(cls, features: Tensor, codebook_size: int, dim: int, *, niter: int = 10, seed: int = 0,
                      max_points_per_centroid: int = 16, max_flat_codes: int = 256,
                      **kwargs) -> "VQGANLCQuantizer":
        """Clusters ``features`` (M >= codebook_size, F) with faiss k-means into the frozen codebook.

        Above ``max_flat_codes`` codes the clustering is a tree of small k-means (see
        :func:`quantkit.quantizers.codebook.faiss_kmeans`), which makes 100,000 codes take seconds, not hours, on a
        CPU.
        """
        if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
            raise ValueError(f"VQGANLCQuantizer.from_features: features must be a float tensor (M, F), got "
                             f"{type(features).__name__ if not isinstance(features, Tensor) else tuple(features.shape)}")
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
            raise ValueError(f"VQGANLCQuantizer.from_features: codebook_size must be a positive int, got "
                             f"{codebook_size!r}")
        if features.shape[0] < codebook_size:
            raise ValueError(f"VQGANLCQuantizer.from_features: features must hold at least codebook_size="
                             f"{codebook_size} vectors, got {features.shape[0]}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("VQGANLCQuantizer.from_features: features contains NaN or inf")
        centroids = faiss_kmeans(features, codebook_size, niter=niter, seed=seed,
                                 max_points_per_centroid=max_points_per_centroid, max_flat_codes=max_flat_codes)
        return cls(dim, codebook_size, features_codebook=centroids, **kwargs)

    @classmethod
    def from_encoder(cls, encoder, dataset, codebook_size: int, dim: int, *, features_per_code: int = 4,
                     num_features: int | None = None, batch_size: int = 256, seed: int = 0, niter: int = 10,
                     max_points_per_centroid: int = 16, max_flat_codes: int = 256, progress: bool = True,
                     **kwargs) -> "VQGANLCQuantizer":
        """The quantizer whose frozen codebook is the k-means of patch features of ``dataset`` (one call).

        encoder: a :class:`quantkit.features.FeatureEncoder`, a quantkit MAE or its run folder, or any module
            mapping (B, C, H, W) images in [0, 1] to (B, N, F) (checked on a probe batch; the wrong shape is
            refused with the expected one named). dataset: map-style, items ``image`` or ``(image, label)``.
        num_features: how many patch features to cluster (default ``features_per_code * codebook_size``, at most
            every patch of the dataset); images are visited in a seeded random order and each contributes a seeded
            random subset of its patches, so the same seed gives the same codebook.
        The remaining keywords go to :meth:`from_features` / the constructor.
        """
        features = sample_patch_features(encoder, dataset, num_features or features_per_code * codebook_size,
                                         codebook_size, batch_size=batch_size, seed=seed, progress=progress)
        start = time.perf_counter()
        if progress:
            print(f"[quantkit] vqgan_lc: k-means of {features.shape[0]:,} features ({features.shape[1]}-d) into "
                  f"{codebook_size:,} codes ...", file=sys.stderr, flush=True)
        q = cls.from_features(features, codebook_size, dim, niter=niter, seed=seed,
                              max_points_per_centroid=max_points_per_centroid, max_flat_codes=max_flat_codes,
                              **kwargs)
        if progress:
            print(f"[quantkit] vqgan_lc: k-means done in {time.perf_counter() - start:.1f} s", file=sys.stderr,
                  flush=True)
        return q

    def save_codebook(self, path: str | os.PathLike) -> str:
        """Writes the frozen (K, feature_dim) codebook to a safetensors file; returns its path."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file({"features_codebook": self.features_codebook.detach().cpu().contiguous()}, tmp)
        os.replace(tmp, path)
        return path

    # ------------------------------------------------------------------------------------------------------------

    def projected_codebook(self) -> Tensor:
        """E' = P(E): (K, dim), the codebook the latents are searched against."""
        return self.projector(self.features_codebook)

    def _search(self, z: Tensor) -> Tensor:
        with torch.no_grad():
            codebook = self.projected_codebook().to(z.dtype)  # (K, dim)
        return nearest_codeword(z.detach(), codebook).indices  # (N,)

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._init_projector(z if mask is None else z[mask])
        indices = self._search(z)  # (N,)
        codes = self._decode(indices).to(z.dtype)  # (N, dim), gradient to the projector only
        weight = None if mask is None else mask.to(z.dtype)
        loss = (self.commitment_weight * masked_mse(z, codes.detach(), weight)
                + self.projector_weight * masked_mse(z.detach(), codes, weight))
        return straight_through(z, codes), indices, loss

    def _encode(self, z: Tensor) -> Tensor:
        return self._search(z)

    def _decode(self, indices: Tensor) -> Tensor:
        return self.projector(self.features_codebook[indices])  # (N, F) -> (N, dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_dim={self.feature_dim}"



def load_codebook(path: str | os.PathLike) -> Tensor:
    """The (K, feature_dim) codebook of a file written by :meth:`VQGANLCQuantizer.save_codebook`."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQGANLCQuantizer: features_codebook file {os.fspath(path)!r} does not exist")
    tensors = load_file(os.fspath(path))
    if "features_codebook" not in tensors:
        raise ValueError(f"VQGANLCQuantizer: {os.fspath(path)!r} holds no 'features_codebook' tensor")
    return tensors["features_codebook"]


@torch.no_grad()
def sample_patch_features(encoder, dataset, num_features: int, min_features: int = 1, *, batch_size: int = 256,
                          seed: int = 0, progress: bool = True) -> Tensor:
    """(M, F) patch features of a seeded random sample of ``dataset``'s images, M = min(num_features, every patch).

    Images are visited in a seeded random order, ``ceil(num_features / len(dataset))`` (at most N) random patches
    of each are kept, until ``num_features`` are collected. Raises ValueError when the whole dataset holds fewer
    than ``min_features`` patches (k-means needs one feature per code).
    """
    from ..data import dataset_channels, stack_batch
    from ..features import as_feature_encoder

    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"sample_patch_features: num_features must be a positive int, got {num_features!r}")
    if len(dataset) == 0:
        raise ValueError("sample_patch_features: the dataset is empty")
    first = stack_batch(dataset, [0])[0]
    encoder = as_feature_encoder(encoder, (dataset_channels(dataset), *first.shape[-2:]))
    n_patches = encoder.num_patches
    available = len(dataset) * n_patches
    if available < min_features:
        raise ValueError(f"sample_patch_features: the dataset has {len(dataset)} images x {n_patches} patches = "
                         f"{available:,} features, fewer than the {min_features:,} codes to cluster into")
    target = min(num_features, available)
    per_image = min(n_patches, -(-target // len(dataset)))  # ceil
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=target, desc="patch features", unit="feat", dynamic_ncols=True)
    chunks, have = [], 0
    try:
        for start in range(0, len(order), batch_size):
            if have >= target:
                break
            images = stack_batch(dataset, order[start:start + batch_size].tolist())[0]
            feats = encoder(images)  # (b, N, F)
            pick = torch.rand(feats.shape[:2], generator=g).argsort(1)[:, :per_image]  # (b, per_image)
            feats = feats.gather(1, pick[..., None].expand(-1, -1, feats.shape[2])).reshape(-1, feats.shape[2])
            feats = feats[:target - have]
            chunks.append(feats)
            have += feats.shape[0]
            if bar is not None:
                bar.update(feats.shape[0])
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(chunks)  # (M, F)

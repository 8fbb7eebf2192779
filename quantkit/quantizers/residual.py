"""Residual quantization over any inner quantizer (RQ-VAE, Lee et al. 2022, arXiv:2203.01941; SoundStream's
quantize-dropout, arXiv:2107.03312).

Depth d quantizes what the earlier depths left over: r_0 = z, q_d = Q_d(r_d), r_{d+1} = r_d - q_d, and the output
is sum_d q_d. Q_d is any registered single-index quantizer (VQ, FSQ, LFQ, ...), one shared module or one per depth.

The one idea to hold: ``indices`` are (..., depth) and every column is an ordinary index of the inner quantizer, so
``decode`` accepts any prefix of the columns (coarse-to-fine), and -1 marks a depth skipped by quantize-dropout
(it decodes to zero).

Gradients: quantized reaches x through the first depth's estimator (straight-through for VQ / LFQ, the bound for
FSQ), which is the chain rule of a straight-through residual stack; deeper depths see a detached residual, so
their own losses train only their own parameters. ``commitment_weight`` adds RQ-VAE's commitment to every partial
sum, mean_d ||x - sg(q_0 + ... + q_d)||^2, which does reach the encoder. ``quant_grad_frac=f`` instead keeps every
residual's graph to x (as vector-quantize-pytorch does): r_{d+1} = r_d - (f q_d + (1 - f) sg(q_d)), so each level's
estimator reaches x and a fraction f of a level's gradient flows back into the earlier levels.

Options: ``codebook_sizes`` gives each depth its own number of codes; :class:`BeamSearch` keeps the best partial
paths instead of the greedy one (beam search over residual paths, as in vector-quantize-pytorch's ResidualVQ; cf.
the beam search of additive quantization, Babenko & Lempitsky 2014). Each level's candidates come from the fused
top-k search (``VectorQuantizer.nearest``), so nothing of size N x K is built: a step holds N x width x width
candidates. The search picks the indices; the ordinary stack then quantizes along them (same loss, gradient and
codebook update as a greedy step, for the chosen codes).

:class:`ImplicitCodebook` (QINCo, Huijben et al. 2024, arXiv:2401.14732): every depth d >= 1 transforms its base
codes with a residual MLP conditioned on the partial reconstruction, c'_k = f_d(q_0 + ... + q_{d-1}, c_k), so each
vector is quantized against its own codebook. That search cannot share one codebook across vectors (the fused
kernel's premise); it runs without gradient over chunks of vectors (peak memory chunk x K x hidden, never N x K x
dim), and only the chosen code is then recomputed with its graph (N x dim).

``diveq`` (a noise variance) applies DiVeQ (openreview.net/forum?id=KRVnpTbx7R) to the whole stack, as
vector-quantize-pytorch's ``ResidualVQ(diveq=True)`` does: the levels' raw codes (carrying their codebooks'
gradients) are summed along residuals that keep that gradient, and in training the output is
z + ||sum - z|| * sg(unit(sum - z + noise)).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import create_quantizer, register_quantizer
from .base import Quantizer
from .codebook import Codebook, CodebookStep
from .gradients import straight_through
from .vq import directional_reparam, masked_mse

__all__ = ["ResidualQuantizer", "BeamSearch", "ImplicitCodebook"]

#: Elements of one chunk of QINCo's per-vector codebooks (chunk x K x max(dim, hidden)): 1 MiB of float32, which stays
#: in cache (measured at 16,384 tokens: 2^18 ran 3x faster in eval than 2^22, at a quarter of the peak memory).
_IMPLICIT_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class ImplicitCodebook:
    """QINCo's implicit neural codebooks (arXiv:2401.14732) for depths >= 1: c'_k = f_d(partial sum, c_k), where f_d
    is Linear(2 dim -> dim) on [partial sum, c_k] followed by ``blocks`` residual blocks x + W2 SiLU(W1 x) of width
    ``hidden`` (default: dim); unit-normalized for cosine codebooks. Needs gradient-trained VQ levels (``ema=None``)
    without projection, k-means or a shared codebook.
    """

    hidden: int | None = None
    blocks: int = 4

    def __post_init__(self):
        for name, value in (("hidden", self.hidden), ("blocks", self.blocks)):
            if value is None and name == "hidden":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "hidden" else 0):
                raise ValueError(f"ImplicitCodebook: {name} must be a {'positive' if name == 'hidden' else '>= 0'} "
                                 f"int, got {value!r}")


class _CodeMLP(nn.Module):
    """f(condition, code) of :class:`ImplicitCodebook`; broadcasts, e.g. condition (c, 1, D) with codes (1, K, D)."""

    def __init__(self, dim: int, hidden: int, blocks: int, normalize: bool):
        super().__init__()
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
                                     for _ in range(blocks)])
        self.dim, self.normalize = dim, normalize

    def forward(self, condition: Tensor, codes: Tensor) -> Tensor:
        w = self.proj_in.weight  # (D, 2D): [condition | code] columns, split so the two terms broadcast
        x = F.linear(condition, w[:, :self.dim], self.proj_in.bias) + F.linear(codes, w[:, self.dim:])
        for block in self.layers:
            x = x + block(x)
        return F.normalize(x, dim=-1) if self.normalize else x


@dataclass(frozen=True)
class BeamSearch:
    """Beam search over residual paths: at every depth each kept path proposes its ``width`` nearest codes, and the
    ``width`` paths of lowest score go on; the last depth keeps the best one. Score: sum over depths of
    ``level_weights[d]`` times that depth's mean squared quantization error (in its codebook space, rescaled by
    ``layer_scale^2d``). Needs levels with a top-k search (``VectorQuantizer``).

    width: paths kept in training (1: the greedy stack).
    eval_width: paths kept in eval and by ``encode`` (default: width).
    level_weights: one weight >= 0 per depth (default: 1 each).
    """

    width: int
    eval_width: int | None = None
    level_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("width", "eval_width"):
            value = getattr(self, name)
            if value is None and name == "eval_width":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BeamSearch: {name} must be a positive int, got {value!r}")
        if self.level_weights is not None:
            weights = tuple(float(w) for w in self.level_weights)
            if not all(0 <= w < float("inf") for w in weights):
                raise ValueError(f"BeamSearch: level_weights must be finite numbers >= 0, got {self.level_weights!r}")
            object.__setattr__(self, "level_weights", weights)

    def width_for(self, training: bool) -> int:
        return self.width if training or self.eval_width is None else self.eval_width


def _per_channel(name: str, value, dim: int) -> float | tuple[float, ...] | None:
    """None, a positive number, or ``dim`` positive numbers (validated)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 < value < float("inf"):
            raise ValueError(f"ResidualQuantizer: {name} must be positive, got {value!r}")
        return float(value)
    values = tuple(float(v) for v in value)
    if len(values) != dim or not all(0 < v < float("inf") for v in values):
        raise ValueError(f"ResidualQuantizer: {name} must be a positive number or {dim} positive numbers (one per "
                         f"channel), got {value!r}")
    return values


def _codebook_sizes(sizes, depth: int, shared: bool, kwargs: dict) -> tuple[int, ...] | None:
    """Validated per-depth codebook sizes (None: the inner quantizer's one ``codebook_size`` for every depth)."""
    if sizes is None:
        return None
    sizes = tuple(sizes)
    if len(sizes) != depth or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in sizes):
        raise ValueError(f"ResidualQuantizer: codebook_sizes must be {depth} positive ints (one per depth), "
                         f"got {sizes!r}")
    if shared and len(set(sizes)) > 1:
        raise ValueError("ResidualQuantizer: a shared codebook has one size; codebook_sizes differ")
    if "codebook_size" in kwargs:
        raise ValueError("ResidualQuantizer: pass codebook_sizes or codebook_size, not both")
    return sizes


def _div(x: Tensor, s: float | Tensor) -> Tensor:
    return x if isinstance(s, float) and s == 1.0 else x / s


def _mul(x: Tensor, s: float | Tensor) -> Tensor:
    return x if isinstance(s, float) and s == 1.0 else x * s


@register_quantizer("residual", example=dict(dim=3, quantizer="fsq", depth=3, levels=(5, 4, 3), layer_scale=0.25))
class ResidualQuantizer(Quantizer):
    """``depth`` residual levels of the quantizer registered as ``quantizer``.

    Args:
        dim: vector size (passed to the inner quantizer too).
        quantizer: registered name of the inner quantizer ("vq", "fsq", "lfq", ...); it must give one index per
            vector.
        depth: number of levels D >= 1.
        shared_codebook: one inner module for every depth (RQ-VAE) instead of D independent ones. With an EMA
            codebook the shared module updates once per depth per step.
        quantize_dropout: probability, per vector and training step, of keeping only a random prefix of
            ``[min_depth, depth]`` levels (SoundStream); skipped levels contribute zero and get index -1.
        min_depth: smallest prefix kept by quantize-dropout.
        layer_scale: when set, depth d quantizes r_d / s^d and returns s^d * q (e.g. 0.5 for residual LFQ, whose
            codes are +-1, or 1 / (L - 1) for residual FSQ), so every level sees a residual of unit scale. A sequence
            of ``dim`` numbers scales each channel separately (residual FSQ with per-channel levels L_i: 1 / L_i).
        input_clamp: when set, x is soft-clamped to +-c before depth 0, c * tanh(x / c) (a number, or one per
            channel), so the first level's bounded range covers it (residual FSQ: c = 1 + 1 / (L - 1)).
        commitment_weight: weight of RQ-VAE's partial-sum commitment (0 disables).
        seed: seeds a private generator for quantize-dropout (default: the global torch RNG).
        channel_first: x is (B, dim, *spatial).
        codebook_sizes: one codebook size per depth (instead of the inner ``codebook_size``); not with a shared
            codebook. ``codebook_size`` is then the largest.
        quant_grad_frac: None (default): quantkit's stack, deeper levels see a detached residual. A number f in
            [0, 1]: residuals keep their graph to x, r_{d+1} = r_d - (f q_d + (1 - f) sg(q_d)) (the peer's).
        beam: beam search over residual paths (:class:`BeamSearch`); None: greedy. In training it starts once every
            level's codebook is initialized (k-means).
        implicit_codebook: QINCo's conditioned codebooks for depths >= 1 (:class:`ImplicitCodebook`); None: off.
        diveq: DiVeQ over the whole stack, with this direction-noise variance (>= 0); needs gradient-trained
            codebooks (``ema=None``). None: off. (The levels' own ``diveq_variance`` is VectorQuantizer's.)
        **quantizer_kwargs: the inner quantizer's other keywords (``codebook_size``, ``levels``, ...).
    """

    def __init__(self, dim: int, quantizer: str = "vq", depth: int = 4, shared_codebook: bool = False,
                 quantize_dropout: float = 0.0, min_depth: int = 1, layer_scale: float | Sequence[float] | None = None,
                 commitment_weight: float = 0.0, seed: int | None = None, channel_first: bool = False,
                 input_clamp: float | Sequence[float] | None = None, codebook_sizes: Sequence[int] | None = None,
                 quant_grad_frac: float | None = None, beam: BeamSearch | None = None,
                 implicit_codebook: ImplicitCodebook | None = None, diveq: float | None = None,
                 **quantizer_kwargs: Any):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"ResidualQuantizer: depth must be an int >= 1, got {depth!r}")
        if not 0.0 <= quantize_dropout <= 1.0:
            raise ValueError(f"ResidualQuantizer: quantize_dropout must be a probability in [0, 1], "
                             f"got {quantize_dropout!r}")
        if isinstance(min_depth, bool) or not isinstance(min_depth, int) or not 1 <= min_depth <= depth:
            raise ValueError(f"ResidualQuantizer: min_depth must be an int in [1, depth={depth}], got {min_depth!r}")
        layer_scale = _per_channel("layer_scale", layer_scale, dim)
        input_clamp = _per_channel("input_clamp", input_clamp, dim)
        if "channel_first" in quantizer_kwargs:
            raise ValueError("ResidualQuantizer: pass channel_first to the ResidualQuantizer, not to the inner "
                             "quantizer (it always sees rows)")
        sizes = _codebook_sizes(codebook_sizes, depth, shared_codebook, quantizer_kwargs)
        if quant_grad_frac is not None and (isinstance(quant_grad_frac, bool) or not isinstance(
                quant_grad_frac, (int, float)) or not 0.0 <= quant_grad_frac <= 1.0):
            raise ValueError(f"ResidualQuantizer: quant_grad_frac must be None or a number in [0, 1], "
                             f"got {quant_grad_frac!r}")
        if beam is not None and not isinstance(beam, BeamSearch):
            raise ValueError(f"ResidualQuantizer: beam must be a BeamSearch or None, got {type(beam).__name__}")
        if beam is not None and beam.level_weights is not None and len(beam.level_weights) != depth:
            raise ValueError(f"ResidualQuantizer: beam.level_weights must have one weight per depth ({depth}), got "
                             f"{len(beam.level_weights)}")
        if sizes is None:
            layers = [create_quantizer(quantizer, dim=dim, **quantizer_kwargs)
                      for _ in range(1 if shared_codebook else depth)]
        else:
            layers = [create_quantizer(quantizer, dim=dim, codebook_size=k, **quantizer_kwargs) for k in sizes]
        if beam is not None and not hasattr(layers[0], "_candidates"):
            raise ValueError(f"ResidualQuantizer: beam search needs levels with a top-k search (VectorQuantizer), "
                             f"got {quantizer!r}")
        if layers[0].num_indices != 1:
            raise ValueError(f"ResidualQuantizer: the inner quantizer {quantizer!r} must give one index per vector, "
                             f"it gives {layers[0].num_indices}")
        if layers[0].dim != dim:
            raise ValueError(f"ResidualQuantizer: the inner quantizer has dim {layers[0].dim}, expected dim={dim}")
        super().__init__(dim, max(layer.codebook_size for layer in layers), channel_first)
        self.layers = nn.ModuleList(layers)
        self.codebook_sizes = tuple(layers[0 if shared_codebook else d].codebook_size for d in range(depth))
        self.quant_grad_frac = None if quant_grad_frac is None else float(quant_grad_frac)
        self.beam = beam
        self.soft = layers[0].soft
        self.identity_gradient = layers[0].identity_gradient  # quantized reaches x through depth 0 only
        self.depth = depth
        self.shared_codebook = shared_codebook
        self.quantize_dropout = float(quantize_dropout)
        self.min_depth = min_depth
        self.layer_scale = layer_scale
        self.input_clamp = input_clamp
        if input_clamp is not None or (quant_grad_frac is not None and depth > 1):
            self.identity_gradient = False
        self.commitment_weight = float(commitment_weight)
        self._generator: torch.Generator | None = None
        self._seed = seed
        self.implicit_codebook = implicit_codebook
        self.mlps = self._implicit_mlps(implicit_codebook) if implicit_codebook is not None else None
        self.diveq = self._check_diveq(diveq)
        if self.diveq is not None:
            self.quant_grad_frac, self.identity_gradient = 1.0, False  # codes' gradients flow along the residuals

    @property
    def num_indices(self) -> int:
        return self.depth

    def _indices_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-1], self.depth)  # the depth axis stays, even at depth 1

    def layer(self, d: int) -> Quantizer:
        """The inner quantizer of depth d."""
        return self.layers[0 if self.shared_codebook else d]

    @contextmanager
    def stepping(self, rule: CodebookStep) -> Iterator[None]:
        """Inside the block, every level's codebook updates follow ``rule`` (e.g. ``CodebookStep(frozen=True)``)."""
        with ExitStack() as stack:
            for layer in self.layers:
                codebook = getattr(layer, "codebook", None)
                if not isinstance(codebook, Codebook):
                    raise ValueError(f"ResidualQuantizer.stepping: the {self.layers[0].registry_name!r} levels have "
                                     "no learned Codebook")
                stack.enter_context(codebook.stepping(rule))
            yield

    def depth_scale(self, d: int, like: Tensor | None = None) -> float | Tensor:
        """s^d: a float, or (dim,) in like's dtype for per-channel scales (computed in float64, then rounded)."""
        s = self.layer_scale
        if s is None:
            return 1.0
        if isinstance(s, float):
            return s ** d
        return torch.tensor([v ** d for v in s], dtype=torch.float64).to(
            device=like.device if like is not None else None, dtype=like.dtype if like is not None else torch.float32)

    def _clamp_input(self, z: Tensor) -> Tensor:
        c = self.input_clamp
        if c is None:
            return z
        c = c if isinstance(c, float) else torch.tensor(c, dtype=z.dtype, device=z.device)
        return torch.tanh(z / c) * c

    # ------------------------------------------------------------------------------------------------------------

    def _kept_depths(self, n: int, mask: Tensor | None, device: torch.device) -> Tensor | None:
        """(n,) number of levels each row keeps this step, or None when every row keeps all of them.

        Only masked-in rows draw (in order), so a masked batch draws exactly what the truncated batch draws."""
        if not (self.training and self.quantize_dropout > 0 and self.min_depth < self.depth):
            return None
        if self._seed is not None and self._generator is None:
            self._generator = torch.Generator().manual_seed(self._seed)
        m = n if mask is None else int(mask.sum())
        drop = torch.rand(m, generator=self._generator) < self.quantize_dropout
        prefix = torch.randint(self.min_depth, self.depth + 1, (m,), generator=self._generator)
        drawn = torch.where(drop, prefix, self.depth).to(device)
        if mask is None:
            return drawn
        return torch.full((n,), self.depth, device=device).masked_scatter(mask, drawn)

    @torch.no_grad()
    def _beam_paths(self, z: Tensor, width: int) -> Tensor:
        """Beam search over residual paths of z (N, dim) (already clamped) -> indices (N, depth) of the best path.

        Every kept path asks its level for its ``width`` nearest codes (the fused top-k search), candidates are
        scored by the weighted sum of their levels' errors, and the ``width`` best (1 at the last depth) go on.
        Peak memory: N x width x width x dim."""
        n, dim = z.shape
        weights = self.beam.level_weights or (1.0,) * self.depth
        residual = z[:, None]  # (N, b, dim), b = 1 path to start
        score = z.new_zeros(n, 1)  # (N, b), lower is better
        paths = torch.zeros(n, 1, 0, dtype=torch.int64, device=z.device)  # (N, b, d)
        for d in range(self.depth):
            last = d == self.depth - 1
            s = self.depth_scale(d, z)
            b = residual.shape[1]
            k = 1 if last else min(width, self.codebook_sizes[d])
            q, idx, err = self.layer(d)._candidates(_div(residual.reshape(n * b, dim), s), k)  # (N b, k, ...)
            if isinstance(s, float):
                err = err * s * s  # the error at the residual's scale
            candidates = score[:, :, None] + weights[d] * err.reshape(n, b, k)  # (N, b, k)
            order = torch.sort(candidates.reshape(n, b * k), dim=1, stable=True)
            keep = 1 if last else width
            pick, score = order.indices[:, :keep], order.values[:, :keep]  # (N, keep), flat over (b, k)
            moved = residual[:, :, None] - _mul(q.to(z.dtype), s).reshape(n, b, k, dim)  # (N, b, k, dim)
            residual = moved.reshape(n, b * k, dim).gather(1, pick[..., None].expand(-1, -1, dim))
            parents = paths.gather(1, (pick // k)[..., None].expand(-1, -1, d))  # (N, keep, d)
            paths = torch.cat([parents, idx.reshape(n, b * k).gather(1, pick)[..., None]], dim=2)
        return paths[:, 0]  # (N, depth)

    def _implicit_mlps(self, cfg: ImplicitCodebook) -> nn.ModuleList:
        if not isinstance(cfg, ImplicitCodebook):
            raise ValueError(f"ResidualQuantizer: implicit_codebook must be an ImplicitCodebook or None, "
                             f"got {type(cfg).__name__}")
        first = self.layers[0]
        codebook = getattr(first, "codebook", None)
        if not hasattr(first, "_candidates") or first.heads != 1 or first.codebook_dim != self.dim:
            raise ValueError("ResidualQuantizer: implicit_codebook needs VectorQuantizer levels without projection")
        if codebook.ema is not None or codebook.kmeans_init is not None or self.shared_codebook or self.beam:
            raise ValueError("ResidualQuantizer: implicit_codebook needs gradient-trained codebooks (ema=None), "
                             "without kmeans_init, shared_codebook or beam search")
        hidden = cfg.hidden or self.dim
        return nn.ModuleList([_CodeMLP(self.dim, hidden, cfg.blocks, first.metric == "cosine")
                              for _ in range(self.depth - 1)])

    def _check_diveq(self, variance: float | None) -> float | None:
        if variance is None:
            return None
        if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not 0 <= variance < float("inf"):
            raise ValueError(f"ResidualQuantizer: diveq must be None or a noise variance >= 0, "
                             f"got {variance!r}")
        codebook = getattr(self.layers[0], "codebook", None)
        if not isinstance(codebook, Codebook) or codebook.ema is not None:
            raise ValueError("ResidualQuantizer: diveq needs levels with gradient-trained codebooks "
                             "(VectorQuantizer with ema=None)")
        if self.quant_grad_frac not in (None, 1.0):
            raise ValueError("ResidualQuantizer: diveq sets quant_grad_frac to 1 (the codes' gradients flow "
                             "along the residuals); leave quant_grad_frac unset")
        return float(variance)

    @torch.no_grad()
    def _implicit_search(self, d: int, h: Tensor, condition: Tensor) -> Tensor:
        """Indices (N,) of the nearest conditioned code of depth d >= 1 for h (N, dim), in chunks of vectors."""
        mlp, base = self.mlps[d - 1], self.layer(d).codebook.lookup(
            torch.arange(self.codebook_sizes[d], device=h.device)).to(h.dtype)  # (K, dim)
        width = max(self.dim, mlp.layers[0][0].out_features if len(mlp.layers) else self.dim)
        chunk = max(1, _IMPLICIT_CHUNK_ELEMENTS // (base.shape[0] * width))
        cosine = self.layer(d).metric == "cosine"
        out = []
        for start in range(0, h.shape[0], chunk):
            codes = mlp(condition[start:start + chunk, None], base[None])  # (c, K, dim)
            rows = h[start:start + chunk, None]  # (c, 1, dim)
            score = -(F.normalize(rows, dim=-1) * codes).sum(-1) if cosine else (rows - codes).square().sum(-1)
            out.append(score.argmin(dim=1))  # (c,)
        return torch.cat(out) if out else h.new_zeros(0, dtype=torch.int64)

    def _implicit_codes(self, d: int, indices: Tensor, condition: Tensor) -> Tensor:
        """The conditioned codes (N, dim) of indices (N,) at depth d >= 1, with their graph."""
        return self.mlps[d - 1](condition, self.layer(d).codebook.lookup(indices).to(condition.dtype))

    def _implicit_level(self, d: int, h: Tensor, condition: Tensor, mask: Tensor | None
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """Depth d >= 1 of a QINCo stack, as a VectorQuantizer level would do it with a per-vector codebook."""
        layer = self.layer(d)
        h = layer._to_codes_space(h)  # normalized for cosine
        indices = self._implicit_search(d, h.detach(), condition.detach())  # (N,)
        codes = self._implicit_codes(d, indices, condition)  # (N, dim): grad to codes, MLP and condition
        weight = None if mask is None else mask.to(h.dtype)
        loss = layer.commitment_weight * masked_mse(h, codes.detach(), weight) + \
            layer.codebook_weight * masked_mse(h.detach(), codes, weight)
        if self.training:
            layer.codebook.update(h.detach() if mask is None else h.detach()[mask],
                                  indices if mask is None else indices[mask])
        return layer._estimate(h, codes, mask), indices, loss

    def beam_width(self) -> int:
        """Paths the beam search keeps in this call (1: greedy). Training waits for every codebook's k-means."""
        width = 1 if self.beam is None else self.beam.width_for(self.training)
        if width > 1 and self.training and not all(bool(getattr(layer, "codebook").initialized)
                                                   for layer in self.layers):
            return 1
        return width

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        kept = self._kept_depths(z.shape[0], mask, z.device)
        residual = self._clamp_input(z)  # (N, dim); only depth 0 keeps the graph to z (unless quant_grad_frac)
        width = self.beam_width()
        paths = self._beam_paths(residual.detach(), width) if width > 1 else None  # (N, depth)
        total_hard = torch.zeros_like(z)  # sum of the kept levels' values
        total = torch.zeros_like(z)  # the same values, carrying each level's gradient paths
        indices, loss, commit = [], z.new_zeros(()), z.new_zeros(())
        for d in range(self.depth):
            active = None if kept is None else kept > d  # (N,)
            layer_mask = active if mask is None else (mask if active is None else mask & active)
            s = self.depth_scale(d, z)
            if self.mlps is not None and d > 0:
                q, idx, layer_loss = self._implicit_level(d, _div(residual, s), total, layer_mask)
            elif paths is None:
                q, idx, layer_loss = self.layer(d)._quantize(_div(residual, s), layer_mask)
            else:
                q, idx, layer_loss = self.layer(d)._quantize(_div(residual, s), layer_mask, indices=paths[:, d])
            if self.diveq is not None:  # the raw code, carrying its codebook's gradient
                q = self.layer(d)._decode(idx)
            q = _mul(q, s)
            if active is not None:
                q = torch.where(active[:, None], q, 0.0)
                idx = torch.where(active, idx, -1)
            indices.append(idx)
            loss = loss + layer_loss
            total = total + q
            total_hard = total_hard + q.detach()
            f = self.quant_grad_frac
            if f is None:
                residual = (residual - q).detach()
            else:  # the peer's: the residual keeps its graph; a fraction f of q's gradient flows back through it
                residual = residual - (q.detach() if f == 0 else f * q + (1 - f) * q.detach())
            if self.commitment_weight:
                err = (z - total_hard).square().sum(-1) / z.shape[1]  # (N,)
                if mask is not None:
                    err = err[mask]
                commit = commit + err.sum() / max(err.shape[0], 1)  # zero, not NaN, for an empty batch
        if self.commitment_weight:
            loss = loss + self.commitment_weight * commit / self.depth
        if self.diveq is not None and self.training:
            total = directional_reparam(z, total, self.diveq, mask)
        return total, torch.stack(indices, dim=-1), loss  # (N, dim), (N, depth), ()

    def _encode(self, z: Tensor) -> Tensor:
        width = 1 if self.beam is None else self.beam.width_for(False)
        if width > 1:
            return self._beam_paths(self._clamp_input(z), width)
        residual, indices = self._clamp_input(z), []
        total = torch.zeros_like(z)  # the partial reconstruction (QINCo's condition)
        for d in range(self.depth):
            s = self.depth_scale(d, z)
            layer = self.layer(d)
            if self.mlps is not None and d > 0:
                idx = self._implicit_search(d, layer._to_codes_space(_div(residual, s)), total)
                q = self._implicit_codes(d, idx, total)
            else:
                idx = layer._encode(_div(residual, s))
                q = layer._decode(idx).to(z.dtype)
            residual = residual - _mul(q, s)
            total = total + _mul(q, s)
            indices.append(idx)
        return torch.stack(indices, dim=-1)  # (N, depth)

    def _decode_levels(self, indices: Tensor) -> tuple[list[Tensor], Tensor]:
        """(N, d') with 1 <= d' <= depth -> (each level's value (N, dim), in order (-1 entries give zeros), their
        sum accumulated in that order)."""
        levels, out = [], None
        for d in range(indices.shape[1]):
            idx = indices[:, d]
            if self.mlps is not None and d > 0:
                q = self._implicit_codes(d, idx.clamp_min(0), out)
            else:
                q = self.layer(d)._decode(idx.clamp_min(0))
            q = _mul(q, self.depth_scale(d, q))
            q = torch.where((idx >= 0)[:, None], q, 0.0)
            levels.append(q)
            out = q if out is None else out + q
        return levels, out

    def _decode(self, indices: Tensor) -> Tensor:
        """(N, d') with 1 <= d' <= depth -> (N, dim): the sum of the first d' levels (-1 entries add nothing)."""
        return self._decode_levels(indices)[1]

    def decode_levels(self, indices: Tensor) -> Tensor:
        """indices (..., d') -> every level's value (d', ..., dim) (channels-last; -1 gives zeros); their sum is
        ``decode``. With implicit codebooks a level's value depends on the earlier ones."""
        if indices.dtype != torch.int64:
            raise ValueError(f"ResidualQuantizer: indices must be int64, got {indices.dtype}")
        self._check_indices(indices)
        levels, _ = self._decode_levels(indices.reshape(-1, indices.shape[-1]))
        return torch.stack(levels).reshape(indices.shape[-1], *indices.shape[:-1], self.dim)

    def decode(self, indices: Tensor) -> Tensor:
        """indices (..., d') with 1 <= d' <= depth -> the sum of the first d' levels, in x's layout (float32)."""
        if indices.dtype != torch.int64:
            raise ValueError(f"ResidualQuantizer: indices must be int64, got {indices.dtype}")
        self._check_indices(indices)
        out = self._decode(indices.reshape(-1, indices.shape[-1])).reshape(*indices.shape[:-1], self.dim)
        return out.movedim(-1, 1) if self.channel_first else out

    def _check_indices(self, indices: Tensor, codebook_size: int | None = None) -> None:
        if indices.dim() < 1 or not 1 <= indices.shape[-1] <= self.depth:
            raise ValueError(f"ResidualQuantizer: indices must have shape (..., d) with 1 <= d <= depth="
                             f"{self.depth}, got {tuple(indices.shape)}")
        if not indices.numel():
            return
        sizes = torch.tensor(self.codebook_sizes[:indices.shape[-1]], device=indices.device)  # (d',)
        if int(indices.min()) < -1 or bool((indices >= sizes).any()):
            raise ValueError(f"ResidualQuantizer: indices of depth d must lie in [0, codebook_sizes[d]) with "
                             f"codebook_sizes={self.codebook_sizes}, or be -1 (a skipped depth), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, shared_codebook={self.shared_codebook}, "
                f"quantize_dropout={self.quantize_dropout}, codebook_sizes={self.codebook_sizes}, "
                f"quant_grad_frac={self.quant_grad_frac}, beam={self.beam}, " + super().extra_repr())

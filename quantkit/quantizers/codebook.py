"""A learned codebook and the machinery that trains it: EMA updates, k-means init, dead-code revival.

- EMA codebook with Laplace smoothing (VQ-VAE, van den Oord et al. 2017, arXiv:1711.00937, appendix A.1;
  Razavi et al. 2019, arXiv:1906.00446): per code k, with this step's count c_k and sum s_k of assigned vectors,
      n_k <- decay n_k + (1 - decay) c_k,   m_k <- decay m_k + (1 - decay) s_k,
      e_k = m_k / n~_k,   n~_k = (n_k + eps) / (n + K eps) * n,   n = sum_k n_k.
- Or a gradient-trained codebook (an ``nn.Parameter``; the quantizer adds the codebook loss).
- k-means initialization (faiss) from the first training batches, deferred until ``min_vectors`` vectors are seen.
- Dead-code revival (Williams et al. 2020, arXiv:2005.08520; RQ-VAE): codes whose EMA usage n_k falls below a
  threshold are replaced by encoder outputs of the current batch.
- Per-step control (:class:`CodebookStep`, set for a block of calls with :meth:`Codebook.stepping`): a per-code
  factor w_k on the EMA rate, n_k <- n_k + (1 - decay) w_k (c_k - n_k) (so w_k = 0 freezes code k); statistics
  accumulated over several calls and applied at once (gradient accumulation); or a frozen codebook. ``decay=1``
  is a codebook that EMA never moves.

The one idea to hold: every statistic is built with ``index_add_`` over the (N,) assigned indices and (N, D)
vectors, never an N x K one-hot; under ``torch.distributed`` the counts and sums are all-reduced, k-means runs on
rank 0 and is broadcast, and revival draws its candidates from a pool gathered from every rank with a generator
seeded identically on all of them, so every rank holds the same codebook after every step.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import nearest_codeword

__all__ = ["EMAConfig", "DeadCodeConfig", "KMeansInit", "CodebookStep", "Codebook", "faiss_kmeans",
           "revive_dead_codes", "track_usage_and_revive", "default_revival_state"]


# ----------------------------------------------------------------------------------------------------------------
# options that travel together


def _check_fraction(owner: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{owner}: {name} must be a number in (0, 1), got {value!r}")


def _check_positive_int(owner: str, name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class EMAConfig:
    """Train the codebook by exponential moving averages (no codebook gradient).

    decay: weight of the past, in (0, 1]; 0.99 as in VQ-VAE (the peer library defaults to 0.8); 1 leaves the codes
        where they are (no EMA movement; dead-code revival, when configured, still replaces codes).
    eps: Laplace smoothing of the counts, > 0; keeps unused codes from dividing by zero.
    """

    decay: float = 0.99
    eps: float = 1e-5

    def __post_init__(self):
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 < self.decay <= 1.0:
            raise ValueError(f"EMAConfig: decay must be a number in (0, 1], got {self.decay!r}")
        if not isinstance(self.eps, (int, float)) or not 0.0 < self.eps < math.inf:
            raise ValueError(f"EMAConfig: eps must be a finite positive number, got {self.eps!r}")


@dataclass(frozen=True)
class DeadCodeConfig:
    """Revive codes whose EMA usage (expected assignments per step) falls below ``threshold``.

    threshold: usage below which a code is dead (> 0).
    decay: decay of the usage average when the codebook is trained by gradient (with EMA training the
        ``EMAConfig.decay`` counts are used).
    reset_usage: usage a revived code restarts with (default: ``threshold``).
    seed: seeds the choice of replacement vectors (together with the step count, identically on every rank).
    """

    threshold: float = 1.0
    decay: float = 0.99
    reset_usage: float | None = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold > 0:
            raise ValueError(f"DeadCodeConfig: threshold must be a positive number, got {self.threshold!r}")
        _check_fraction("DeadCodeConfig", "decay", self.decay)
        if self.reset_usage is not None and not (isinstance(self.reset_usage, (int, float)) and self.reset_usage > 0):
            raise ValueError(f"DeadCodeConfig: reset_usage must be a positive number, got {self.reset_usage!r}")


@dataclass(frozen=True)
class KMeansInit:
    """Initialize the codebook with faiss k-means on the first training vectors.

    min_vectors: how many (masked-in, all ranks together) vectors to collect before clustering; default: the
        codebook size (faiss needs at least one vector per centroid).
    niter: Lloyd iterations. seed: faiss seed.
    max_points_per_centroid: faiss subsamples to codebook_size x this many vectors.
    max_flat_codes: above this many codes, cluster in two levels (see :func:`faiss_kmeans`).
    """

    min_vectors: int | None = None
    niter: int = 10
    seed: int = 1234
    max_points_per_centroid: int = 256
    max_flat_codes: int = 4096

    def __post_init__(self):
        _check_positive_int("KMeansInit", "min_vectors", self.min_vectors, allow_none=True)
        _check_positive_int("KMeansInit", "niter", self.niter)
        _check_positive_int("KMeansInit", "max_points_per_centroid", self.max_points_per_centroid)
        _check_positive_int("KMeansInit", "max_flat_codes", self.max_flat_codes)


@dataclass(frozen=True)
class CodebookStep:
    """How the training steps taken inside :meth:`Codebook.stepping` update the codebook (default: ordinarily).

    weight: per-code factor w_k >= 0 on the EMA rate (1 - decay), for the usage and the EMA sums: a (K,) tensor,
        or a callable ``(sums (K, D) or None without EMA, counts (K,)) -> (K,)`` given this step's statistics
        (all ranks). None: 1 for every code.
    accumulate: add this step's statistics to a pending total instead of applying them; the next step that does
        not accumulate applies the total (its own statistics included) as one EMA step, then revives dead codes.
    frozen: nothing changes (no statistics, no EMA, no revival); k-means initialization still happens.
    """

    weight: Tensor | Callable[[Tensor | None, Tensor], Tensor] | None = None
    accumulate: bool = False
    frozen: bool = False

    def __post_init__(self):
        if self.weight is not None and not (isinstance(self.weight, Tensor) or callable(self.weight)):
            raise ValueError(f"CodebookStep: weight must be a (K,) tensor, a callable or None, "
                             f"got {type(self.weight).__name__}")
        for name in ("accumulate", "frozen"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CodebookStep: {name} must be a bool, got {getattr(self, name)!r}")


def _code_weight(weight: Tensor, num_codes: int) -> Tensor:
    """Validates a per-code EMA weight: (K,), floating point, finite, >= 0."""
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (num_codes,) or not weight.is_floating_point():
        raise ValueError(f"CodebookStep: weight must be a floating-point tensor of shape ({num_codes},) (one factor "
                         f"per code), got {getattr(weight, 'dtype', type(weight).__name__)} of shape "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError("CodebookStep: weight must be finite and >= 0")
    return weight.detach()


# ----------------------------------------------------------------------------------------------------------------
# faiss k-means


def _flat_kmeans(x, k: int, niter: int, seed: int, spherical: bool, max_points_per_centroid: int):
    import faiss  # deferred: faiss is only needed when k-means runs

    if x.shape[0] == k:  # faiss copies the points in that case; do the same without its warning
        return x.copy()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=spherical, verbose=False,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    km.train(x)
    return km.centroids


def _split_codes(sizes: list[int], k: int) -> list[int]:
    """k codes over groups of ``sizes`` points: proportional (largest remainder), >= 1 and <= size per group."""
    n = sum(sizes)
    share = [k * s / n for s in sizes]
    out = [min(s, max(1, int(f))) for s, f in zip(sizes, share)]
    order = sorted(range(len(sizes)), key=lambda g: share[g] - int(share[g]), reverse=True)
    while sum(out) < k:  # hand out the remainder, largest fraction first, where a group has points to spare
        for g in order:
            if sum(out) == k:
                break
            if out[g] < sizes[g]:
                out[g] += 1
    while sum(out) > k:  # the >= 1 floor can overshoot: take back from the largest groups
        g = max(range(len(out)), key=lambda i: out[i])
        out[g] -= 1
    return out


def _tree_kmeans(xs, k: int, niter: int, seed: int, spherical: bool, max_points_per_centroid: int,
                 max_flat_codes: int, branching: int):
    """Flat k-means up to ``max_flat_codes`` centroids; above, ``branching`` coarse clusters, each given its share
    of the k codes and clustered recursively. (n, D) numpy float32 -> (k, D)."""
    import numpy as np

    if k <= max_flat_codes:
        return _flat_kmeans(xs, k, niter, seed, spherical, max_points_per_centroid)
    branching = min(branching, k)
    coarse = _flat_kmeans(xs, branching, niter, seed, spherical, max_points_per_centroid)  # (branching, D)
    assign = nearest_codeword(torch.from_numpy(xs), torch.from_numpy(coarse),
                              "cosine" if spherical else "l2").indices.numpy()  # (n,)
    members = [m for m in (np.flatnonzero(assign == g) for g in range(branching)) if len(m)]
    if len(members) < 2:  # degenerate data (all rows alike): the tree would not shrink the problem
        return _flat_kmeans(xs, k, niter, seed, spherical, max_points_per_centroid)
    shares = _split_codes([len(m) for m in members], k)
    return np.concatenate([_tree_kmeans(xs[m], kg, niter, seed + 1 + g, spherical, max_points_per_centroid,
                                        max_flat_codes, branching) for g, (m, kg) in enumerate(zip(members, shares))])


def faiss_kmeans(x: Tensor, k: int, niter: int = 10, seed: int = 1234, spherical: bool = False,
                 max_points_per_centroid: int = 256, max_flat_codes: int = 4096, branching: int = 32) -> Tensor:
    """k-means centroids (k, D) of the rows of x (n >= k, D) with faiss, float32 on x's device.

    Up to ``max_flat_codes`` centroids this is plain ``faiss.Kmeans`` (same seed, same centroids). Above it, a flat
    Lloyd step costs n x k x D per iteration (100,000 codes: hours on two cores), so the rows are clustered as a
    tree: ``branching`` coarse clusters, each getting its share of the k codes from its own (recursive) k-means, for
    about n x D x (branching x levels + leaf size) per iteration. It mirrors VQGAN-LC's own recipe (k-means per
    ImageNet class, arXiv:2406.11837), with coarse clusters standing in for the classes.
    """
    n = x.shape[0]
    if n < k:
        raise ValueError(f"faiss_kmeans: need at least k={k} vectors, got {n}")
    xs = x.detach().float().cpu().contiguous().numpy()
    if k <= max_flat_codes:
        centroids = _flat_kmeans(xs, k, niter, seed, spherical, max_points_per_centroid)
    else:
        import faiss

        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # many small problems: OpenMP start-up and contention would dominate
        try:
            centroids = _tree_kmeans(xs, k, niter, seed, spherical, max_points_per_centroid, max_flat_codes,
                                     max(2, branching))
        finally:
            faiss.omp_set_num_threads(threads)
    return torch.from_numpy(centroids).reshape(k, -1).to(x.device)


# ----------------------------------------------------------------------------------------------------------------
# torch.distributed helpers: no-ops in a single process


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_reduce_(t: Tensor) -> Tensor:
    if _world()[0] > 1:
        dist.all_reduce(t)
    return t


def _all_gather_rows(rows: Tensor, capacity: int) -> Tensor:
    """Concatenation, in rank order, of every rank's ``rows`` (n_r, D) with n_r <= capacity -> (sum n_r, D)."""
    world, _ = _world()
    if world == 1:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    padded = rows.new_zeros(capacity, rows.shape[1])
    padded[:rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:int(c)] for g, c in zip(gathered, counts)])


def _generator(*seeds: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(hash(tuple(seeds)) & 0x7FFF_FFFF_FFFF_FFFF)  # ints hash to themselves: same on every rank
    return g


# ----------------------------------------------------------------------------------------------------------------
# the codebook


@torch.no_grad()
def revive_dead_codes(weight: Tensor, usage: Tensor, z: Tensor, cfg: DeadCodeConfig, step: int,
                      metric: str = "l2", embed_sum: Tensor | None = None) -> Tensor:
    """Dead-code revival shared by every learned codebook: codes of ``weight`` (K, D) whose EMA ``usage`` (K,)
    is below ``cfg.threshold`` (least used first) are replaced in place by distinct rows of z (n, D), pooled over
    ranks with generators seeded by (cfg.seed, step), so every rank revives identically. Revived codes restart
    at ``cfg.reset_usage`` (default: the threshold); ``embed_sum`` (EMA training) is reset consistently.
    Returns the revived code indices."""
    dead = torch.nonzero(usage < cfg.threshold).reshape(-1)  # (m,), same on every rank
    if dead.numel() == 0:
        return dead[:0]
    dead = dead[torch.argsort(usage[dead], stable=True)]
    m = dead.numel()
    world, rank = _world()
    local = torch.randperm(z.shape[0], generator=_generator(cfg.seed, step, rank))[:m].to(z.device)
    pool = _all_gather_rows(z[local].to(usage.dtype), m)  # (p, D), p <= world * m
    if pool.shape[0] == 0:
        return dead[:0]
    pick = torch.randperm(pool.shape[0], generator=_generator(cfg.seed, step, -1))[:m].to(z.device)
    chosen, revived = pool[pick], dead[:pick.numel()]
    if metric == "cosine":
        chosen = F.normalize(chosen, dim=-1)
    reset = cfg.threshold if cfg.reset_usage is None else cfg.reset_usage
    weight[revived] = chosen.to(weight.dtype)
    usage[revived] = reset
    if embed_sum is not None:
        embed_sum[revived] = (chosen * reset).to(embed_sum.dtype)
    return revived


@torch.no_grad()
def track_usage_and_revive(weight: Tensor, usage: Tensor, steps: Tensor, z: Tensor, indices: Tensor,
                           cfg: DeadCodeConfig, metric: str = "l2") -> None:
    """One training step of a gradient-trained codebook outside :class:`Codebook`: EMA ``usage`` (K,) of this
    step's ``indices`` (n,) (all ranks), revival of the dead codes of ``weight`` (K, D) from z (n, D), ``steps``
    (0-dim int64) advanced. Everything is updated in place."""
    counts = torch.zeros_like(usage).index_add_(0, indices, torch.ones_like(indices, dtype=usage.dtype))
    usage.lerp_(_all_reduce_(counts), 1.0 - cfg.decay)
    revive_dead_codes(weight, usage, z.detach().to(usage.dtype), cfg, int(steps), metric)
    steps += 1


def default_revival_state(state_dict: dict, prefix: str, usage: Tensor, steps: Tensor) -> None:
    """For ``_load_from_state_dict``: a checkpoint without the revival state (written before it existed, or
    imported) loads with fresh counters."""
    state_dict.setdefault(prefix + "usage", torch.ones_like(usage))
    state_dict.setdefault(prefix + "steps", torch.zeros_like(steps))


class Codebook(nn.Module):
    """K codes of size D with their training state. The quantizer searches ``search_weight()`` and gathers codes
    with ``lookup``; in training it calls ``prepare`` (k-means) before the search and ``update`` after it.

    Buffers (all persistent, so a state_dict reproduces the indices): ``weight`` (or the Parameter of that name
    when trained by gradient), ``usage`` (K,) EMA counts, ``embed_sum`` (K, D) EMA sums (EMA training only),
    ``initialized`` (k-means done, or not needed), ``steps`` (training updates so far; seeds revival).
    """

    def __init__(self, num_codes: int, dim: int, metric: str = "l2", ema: EMAConfig | None = EMAConfig(),
                 dead_code: DeadCodeConfig | None = None, kmeans_init: KMeansInit | None = None):
        super().__init__()
        for name, value, kind in (("ema", ema, EMAConfig), ("dead_code", dead_code, DeadCodeConfig),
                                  ("kmeans_init", kmeans_init, KMeansInit)):
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"Codebook: {name} must be a {kind.__name__} or None, got {type(value).__name__}")
        if kmeans_init is not None and kmeans_init.min_vectors is not None and kmeans_init.min_vectors < num_codes:
            raise ValueError(f"Codebook: kmeans_init.min_vectors must be >= codebook_size={num_codes}, "
                             f"got {kmeans_init.min_vectors}")
        self.num_codes, self.dim, self.metric = num_codes, dim, metric
        self.ema, self.dead_code, self.kmeans_init = ema, dead_code, kmeans_init
        init = torch.randn(num_codes, dim)  # (K, D); k-means or revival replace it with data
        if metric == "cosine":
            init = F.normalize(init, dim=-1)
        if ema is not None:
            self.register_buffer("weight", init)
            self.register_buffer("embed_sum", init.clone())  # consistent with usage = 1: e_k = m_k / 1
        else:
            self.weight = nn.Parameter(init)
        self.register_buffer("usage", torch.ones(num_codes))
        self.register_buffer("initialized", torch.tensor(kmeans_init is None))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self._pool: list[Tensor] = []  # k-means candidates seen so far (this rank), until initialized
        self.step_rule = CodebookStep()  # set for a block of calls by ``stepping``
        self._pending: Tensor | None = None  # accumulated (K, 1 + D) counts and sums (K, 1 without EMA)

    # ------------------------------------------------------------------------------------------------------------
    # search and lookup (pure)

    def search(self, z: Tensor, k: int = 1):
        """Nearest codes of z (n, D) -> NearestCodewords; ranks by cosine for cosine codebooks."""
        return nearest_codeword(z.detach(), self.weight.detach().to(z.dtype), self.metric, k)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes (n, D) of indices (n,), differentiable w.r.t. a gradient-trained weight; unit norm for cosine."""
        codes = F.embedding(indices, self.weight)
        return F.normalize(codes, dim=-1) if self.metric == "cosine" else codes

    # ------------------------------------------------------------------------------------------------------------
    # training: k-means before the search, EMA and revival after it

    @contextmanager
    def stepping(self, rule: CodebookStep) -> Iterator[None]:
        """Inside the block, training updates follow ``rule`` (per-code EMA weight, accumulation, frozen)."""
        if not isinstance(rule, CodebookStep):
            raise ValueError(f"Codebook.stepping: rule must be a CodebookStep, got {type(rule).__name__}")
        if isinstance(rule.weight, Tensor):
            _code_weight(rule.weight, self.num_codes)  # refused before any state changes
        saved, self.step_rule = self.step_rule, rule
        try:
            yield
        finally:
            self.step_rule = saved

    @torch.no_grad()
    def prepare(self, z: Tensor) -> None:
        """Collects masked-in vectors z (n, D) for k-means and runs it once enough have been seen (all ranks)."""
        if bool(self.initialized):
            return
        cfg = self.kmeans_init
        need = cfg.min_vectors or self.num_codes
        have = sum(p.shape[0] for p in self._pool)
        if have < need:
            self._pool.append(z.detach().to(self.usage.dtype)[:need - have].clone())
            have = sum(p.shape[0] for p in self._pool)
        total = _all_reduce_(torch.tensor([float(have)], device=z.device))
        if float(total) < need:
            return
        pool = _all_gather_rows(torch.cat(self._pool), need)  # (n_all, D), rank order
        world, rank = _world()
        centroids = pool.new_empty(self.num_codes, self.dim)
        if rank == 0:
            centroids = faiss_kmeans(pool, self.num_codes, cfg.niter, cfg.seed, self.metric == "cosine",
                                     cfg.max_points_per_centroid, cfg.max_flat_codes).to(pool.dtype)
        if world > 1:
            dist.broadcast(centroids, src=0)
        if self.metric == "cosine":
            centroids = F.normalize(centroids, dim=-1)
        # Counts restart at the pool's cluster sizes rescaled to one batch: usage is "assignments per step".
        assigned = nearest_codeword(pool, centroids, self.metric).indices  # (n_all,)
        counts = torch.zeros_like(self.usage).index_add_(0, assigned, torch.ones_like(assigned, dtype=pool.dtype))
        batch = _all_reduce_(torch.tensor([float(z.shape[0])], dtype=pool.dtype, device=z.device))
        self.weight.data.copy_(centroids)
        self.usage.copy_(counts * (batch / pool.shape[0]))
        if self.ema is not None:
            self.embed_sum.copy_(centroids * self.usage[:, None])
        self.initialized.fill_(True)
        self._pool = []

    @torch.no_grad()
    def update(self, z: Tensor, indices: Tensor) -> None:
        """One training step's statistics from masked-in vectors z (n, D) and their codes (n,): EMA usage (and
        sums / weights with EMA training), then revival of dead codes, as ``step_rule`` says. Identical on every
        rank."""
        rule = self.step_rule
        if not bool(self.initialized) or rule.frozen:
            return
        z = z.detach().to(self.usage.dtype)  # float32, or float64 after .double()
        counts = torch.zeros_like(self.usage).index_add_(0, indices, torch.ones_like(indices, dtype=z.dtype))
        decay = self.ema.decay if self.ema is not None else self.dead_code.decay if self.dead_code else None
        if decay is None:  # nothing to track: a gradient-trained codebook without revival
            self.steps += 1
            return
        if self.ema is not None:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, z)  # (K, D)
            stats = _all_reduce_(torch.cat([counts[:, None], sums], dim=1))  # one collective: (K, 1 + D)
        else:
            stats = _all_reduce_(counts[:, None])  # (K, 1)
        if rule.accumulate:
            self._pending = stats if self._pending is None else self._pending + stats
            return
        rate = 1.0 - decay
        if rule.weight is not None:  # evaluated on this call's statistics, as the peer library does
            weight = rule.weight(stats[:, 1:] if self.ema is not None else None, stats[:, 0]) \
                if callable(rule.weight) and not isinstance(rule.weight, Tensor) else rule.weight
            rate = rate * _code_weight(weight.to(stats), self.num_codes)  # (K,)
        if self._pending is not None:
            stats, self._pending = stats + self._pending, None
        moves = not (isinstance(rate, float) and rate == 0.0)  # decay = 1: the codes stay exactly where they are
        if moves:
            rate_k = rate[:, None] if isinstance(rate, Tensor) else rate
            self.usage.lerp_(stats[:, 0], rate)
            if self.ema is not None:
                self.embed_sum.lerp_(stats[:, 1:], rate_k)
                n = self.usage.sum()
                smoothed = (self.usage + self.ema.eps) / (n + self.num_codes * self.ema.eps) * n  # (K,)
                weight = self.embed_sum / smoothed[:, None]
                self.weight.copy_(F.normalize(weight, dim=-1) if self.metric == "cosine" else weight)
        if self.dead_code is not None:
            self._revive(z)
        self.steps += 1

    def _revive(self, z: Tensor) -> None:
        """Replaces codes with usage < threshold (least used first) by distinct rows of z, pooled over ranks."""
        revive_dead_codes(self.weight.data, self.usage, z, self.dead_code, int(self.steps), self.metric,
                          self.embed_sum if self.ema is not None else None)

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, metric={self.metric!r}, ema={self.ema}, "
                f"dead_code={self.dead_code}, kmeans_init={self.kmeans_init}")

"""quantkit's custom ops: schemas, pure-PyTorch references, fake kernels, autograd and typed wrappers.

This is the only module that names ``torch.ops.quantkit.*``. Each op's schema is defined here, so every op exists
(and traces under ``torch.compile``) even when the compiled extension is missing; its reference implementation is
registered on ``CompositeExplicitAutograd`` and the compiled CPU / CUDA kernels in ``csrc/`` override it per device.

Ops
    nearest_codeword(z, codebook, metric, k)  -> (indices, distances)   k nearest codewords of every row
    soft_assign(z, codebook, temperature, metric) -> quantized          softmax(-d / temperature) @ codebook

The one idea to hold: neither op ever builds the N x K distance matrix in its compiled kernels; the references
below do, one row chunk at a time, which bounds their memory by ``_REF_CHUNK_ELEMENTS`` (not N x K).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _ext

__all__ = ["METRICS", "NearestCodewords", "nearest_codeword", "soft_assign", "nearest_codeword_reference",
           "soft_assign_reference"]

#: Metric name -> integer code passed to the kernels. Smaller distance is nearer for every metric:
#: l2 = sum((z - c)^2), cosine = 1 - cos(z, c), dot = -(z . c).
METRICS = {"l2": 0, "cosine": 1, "dot": 2}
_L2, _COSINE, _DOT = 0, 1, 2
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REF_CHUNK_ELEMENTS = 1 << 22  # rows x codes held at once by a reference (16 MiB of float32)
_COSINE_EPS = 1e-12
_CUDA_MAX_K = 32  # the CUDA nearest_codeword kernel keeps a row's k best in registers
_CUDA_SOFT_ASSIGN_MAX_BYTES = 64 * 1024  # the CUDA soft_assign kernel's per-row accumulator (D x 4 or 8 bytes)


def _torch_minor() -> tuple[int, int]:
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return major, minor


#: Whether an error raised inside the compiled kernels reaches Python as a RuntimeError. On torch 2.11 (CUDA 13
#: build, seen on an H200 machine) any C++ error thrown across the stable-ABI boundary killed the process with a
#: segmentation fault, CPU and CUDA kernels alike; on 2.13 it raises. Below 2.13 the wrappers therefore check in
#: Python, before calling a kernel, everything the kernels would reject (non-finite values included).
_KERNEL_ERRORS_RAISE = _torch_minor() >= (2, 13)

_lib = torch.library.Library("quantkit", "DEF")
_lib.define("nearest_codeword(Tensor z, Tensor codebook, int metric, int k, bool centred=False) -> "
            "(Tensor indices, Tensor distances)")
_lib.define("soft_assign(Tensor z, Tensor codebook, Tensor temperature, int metric) -> (Tensor out, Tensor lse)")
_lib.define("cpu_isa() -> int")  # the CPU kernels' instruction set: 2 AVX-512, 1 AVX2 + FMA, 0 portable
_lib.define(
    "soft_assign_backward(Tensor grad_out, Tensor z, Tensor codebook, Tensor temperature, Tensor out, Tensor lse,"
    " int metric) -> (Tensor grad_z, Tensor grad_codebook, Tensor grad_temperature)"
)


class NearestCodewords(NamedTuple):
    """Result of :func:`nearest_codeword`: int64 indices and float32 distances, shape (N,) or (N, k)."""

    indices: Tensor
    distances: Tensor


# ----------------------------------------------------------------------------------------------------------------
# input validation (shared by the wrappers; the kernels check values, the wrappers check shapes and dtypes)


def _check_pair(op: str, z: Tensor, codebook: Tensor) -> None:
    if not isinstance(z, Tensor) or not isinstance(codebook, Tensor):
        raise TypeError(f"{op}: z and codebook must be tensors, got {type(z).__name__} and {type(codebook).__name__}")
    if z.dim() != 2:
        raise ValueError(f"{op}: z must have shape (N, D), got shape {tuple(z.shape)}")
    if codebook.dim() != 2:
        raise ValueError(f"{op}: codebook must have shape (K, D), got shape {tuple(codebook.shape)}")
    if codebook.shape[1] != z.shape[1]:
        raise ValueError(f"{op}: codebook must have D={z.shape[1]} columns to match z, got shape {tuple(codebook.shape)}")
    if codebook.shape[0] < 1:
        raise ValueError(f"{op}: codebook must hold at least one codeword, got shape {tuple(codebook.shape)}")
    for name, t in (("z", z), ("codebook", codebook)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if z.device != codebook.device:
        raise ValueError(f"{op}: z and codebook must be on the same device, got z on {z.device} and codebook on "
                         f"{codebook.device}")


def _metric_code(op: str, metric: str) -> int:
    if metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {sorted(METRICS)}, got {metric!r}")
    return METRICS[metric]


def _common_dtype(z: Tensor, codebook: Tensor) -> torch.dtype:
    return z.dtype if z.dtype == codebook.dtype else torch.promote_types(z.dtype, codebook.dtype)


def _check_finite(op: str, name: str, t: Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: {name} contains NaN or inf; quantkit rejects non-finite inputs")


def _values_checked_in_python() -> bool:
    """True where kernel errors cannot reach Python (see ``_KERNEL_ERRORS_RAISE``): the wrappers check values first.

    Not while compiling (a data-dependent check would break the graph); there the kernel's own check stands.
    """
    return not _KERNEL_ERRORS_RAISE and not torch.compiler.is_compiling()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunk(num_codes: int) -> int:
    return max(1, _REF_CHUNK_ELEMENTS // max(1, num_codes))


# ----------------------------------------------------------------------------------------------------------------
# the codebook-centred frame (precision on data with a large common mean)
#
# Encoder features usually share a large common mean, and the expanded form ||z||^2 - 2 z.c + ||c||^2 that every
# fast search ranks with then cancels catastrophically: with an offset 1e4 x the spread, float32 keeps no digit of
# the distance differences. l2 distances are translation invariant, so both sides are first moved into a frame
# centred on the codebook (z - m, c - m, each subtraction correctly rounded in the compute type); cosine is moved
# onto the unit sphere in float64 and centred there, with a small per-code bias (see _ranking_frame). The ranking
# error then scales with the spread of the data about m, not with its distance from the origin. The CPU kernel
# builds the frame itself while it packs its tiles (``centred=True``: no copy of z or the codebook); the reference
# builds it from copies; for the CUDA kernel the wrapper builds it on the device (the bias of cosine rides in one
# extra column against a column of ones).

_CENTRE_SAMPLES = 256  # codewords, at evenly spaced indices, whose mean is the frame's centre


def _codebook_centre(codebook: Tensor, op: str = "nearest_codeword", unit: bool = False) -> Tensor:
    """(D,) float64 mean of up to 256 codewords at evenly spaced indices (any point near the data would do); with
    ``unit`` the mean of those codewords scaled to unit norm (the centre of the cosine frame)."""
    num = codebook.shape[0]
    take = min(num, _CENTRE_SAMPLES)
    rows = codebook.detach()[::max(1, num // take)][:take].double()  # a strided view: no indexing kernel per call
    centre = (_unit_rows(rows) if unit else rows).mean(0)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(centre).all()):
        raise ValueError(f"{op}: codebook contains NaN or inf; quantkit rejects non-finite inputs")
    return centre


def _unit_rows(t: Tensor) -> Tensor:
    """Rows scaled to unit norm in float64 (rows shorter than the cosine eps are scaled as the op defines)."""
    t = t.double()
    return t / t.norm(dim=-1, keepdim=True).clamp_min(_COSINE_EPS)


def _ranking_frame(z: Tensor, codebook: Tensor, metric: int, centre: Tensor | None, acc: torch.dtype):
    """(z', c', bias, scale): the score (z'.c') * scale + bias ranks like -distance (larger is nearer).

    Without a centre (or for dot) z' and c' are the inputs; l2 moves both by -m; cosine scales both to unit norm and
    then moves them by -m: with u = z/|z|, v = c/|c|, u.v = u'.c' + m.v + (a per-row constant) and
    m.v = (|v|^2 - |c'|^2) / 2 + const, so the bias is -|c'|^2 / 2 + (|v|^2 - 1) / 2: terms of the order of the
    spread squared, whose rounding stays inside the tolerance. Each moved value is computed in float64 and rounded
    once to ``acc``.
    (The CPU kernel applies the same frame while it packs its tiles, without these copies.)
    """
    if centre is None or metric == _DOT:
        zf, cf = z.to(acc), codebook.to(acc)
        if metric == _L2:
            return zf, cf, -0.5 * cf.square().sum(-1), None
        if metric == _COSINE:
            return zf, cf, None, 1.0 / cf.norm(dim=-1).clamp_min(_COSINE_EPS)
        return zf, cf, None, None
    m = centre.double()
    if metric == _L2:
        zf, cf = (z.double() - m).to(acc), (codebook.double() - m).to(acc)
        return zf, cf, (-0.5 * cf.double().square().sum(-1)).to(acc), None
    v = _unit_rows(codebook)
    zf, cf = (_unit_rows(z) - m).to(acc), (v - m).to(acc)
    # m.v = (|v|^2 - |c'|^2) / 2 + const: small terms only (m.c' rounded to float would exceed the tolerance)
    bias = -0.5 * cf.double().square().sum(-1) + 0.5 * (v.square().sum(-1) - 1.0)
    return zf, cf, bias.to(acc), None


# ----------------------------------------------------------------------------------------------------------------
# nearest_codeword


def _codeword_distance(z: Tensor, codes: Tensor, metric: int) -> Tensor:
    """Direct distance between each row of z (n, D) and its gathered codewords codes (n, k, D) -> (n, k)."""
    if metric == _L2:
        return (z.unsqueeze(1) - codes).square().sum(-1)
    dot = (z.unsqueeze(1) * codes).sum(-1)
    if metric == _DOT:
        return -dot
    norms = z.norm(dim=-1, keepdim=True).clamp_min(_COSINE_EPS) * codes.norm(dim=-1).clamp_min(_COSINE_EPS)
    return 1.0 - dot / norms


def nearest_codeword_reference(z: Tensor, codebook: Tensor, metric: int, k: int,
                               centred: bool = False) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch reference of ``quantkit::nearest_codeword``: (indices (N, k) int64, distances (N, k)).

    Ranks by the expanded form (in the codebook-centred frame when ``centred``, see :func:`_ranking_frame`) one row
    chunk at a time (ties: lowest index, via a stable sort), then measures the chosen codewords directly from z and
    the codebook in float64, so the distances do not depend on the frame and l2 distances are never negative.
    """
    _check_finite("nearest_codeword", "z", z)
    _check_finite("nearest_codeword", "codebook", codebook)
    acc = _compute_dtype(z.dtype)
    centre = _codebook_centre(codebook, unit=metric == _COSINE) if centred and metric != _DOT else None
    zr, cr, bias, scale = _ranking_frame(z.detach(), codebook.detach(), metric, centre, acc)
    zf, cf = z.to(acc), codebook.to(acc)
    n = zf.shape[0]
    indices = torch.empty(n, k, dtype=torch.int64, device=z.device)
    distances = torch.empty(n, k, dtype=acc, device=z.device)
    step = _row_chunk(cf.shape[0])
    for start in range(0, n, step):
        score = zr[start:start + step] @ cr.T  # (n, K): larger is nearer
        if scale is not None:
            score *= scale
        if bias is not None:
            score += bias
        if k == 1:  # argmax returns the first maximum: ties go to the lowest index
            order = score.argmax(dim=1, keepdim=True)  # (n, 1)
        else:
            order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]  # (n, k)
        indices[start:start + step] = order
        # measured in float64, as the kernel does: 1 - cos cancels in float32 for near-parallel vectors
        distances[start:start + step] = _codeword_distance(zf[start:start + step].double(), cf[order].double(),
                                                           metric).to(acc)
    return indices, distances.float() if acc == torch.float32 else distances


@torch.library.impl(_lib, "nearest_codeword", "CompositeExplicitAutograd")
def _nearest_codeword_composite(z, codebook, metric, k, centred=False):
    return nearest_codeword_reference(z, codebook, metric, k, centred)


@torch.library.register_fake("quantkit::nearest_codeword")
def _nearest_codeword_fake(z, codebook, metric, k, centred=False):
    torch._check(z.dim() == 2 and codebook.dim() == 2 and z.shape[1] == codebook.shape[1])
    out_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    return z.new_empty((z.shape[0], k), dtype=torch.int64), z.new_empty((z.shape[0], k), dtype=out_dtype)


def _nearest_codeword_setup_context(ctx, inputs, output):
    z, codebook, metric = inputs[:3]
    ctx.metric = metric
    ctx.save_for_backward(z, codebook, output[0])


def _nearest_codeword_backward(ctx, grad_indices, grad_distances):
    """Gradient of the returned distances w.r.t. z and the codebook (the indices are piecewise constant)."""
    z, codebook, indices = ctx.saved_tensors
    acc = _compute_dtype(z.dtype)
    zf, cf, g = z.to(acc), codebook.to(acc), grad_distances.to(acc)  # (N, D), (K, D), (N, k)
    codes = cf[indices]  # (N, k, D)
    zk = zf.unsqueeze(1)  # (N, 1, D)
    if ctx.metric == _L2:
        grad_z_k, grad_c_k = 2.0 * (zk - codes), -2.0 * (zk - codes)
    elif ctx.metric == _DOT:
        grad_z_k, grad_c_k = -codes, -zk.expand_as(codes)
    else:
        z_norm = zk.norm(dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
        c_norm = codes.norm(dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
        z_hat, c_hat = zk / z_norm, codes / c_norm
        cos = (z_hat * c_hat).sum(-1, keepdim=True)
        grad_z_k = -(c_hat - cos * z_hat) / z_norm
        grad_c_k = -(z_hat - cos * c_hat) / c_norm
    grad_z = grad_codebook = None
    if ctx.needs_input_grad[0]:
        grad_z = (g.unsqueeze(-1) * grad_z_k).sum(1).to(z.dtype)
    if ctx.needs_input_grad[1]:
        grad_codebook = torch.zeros_like(cf).index_add_(0, indices.reshape(-1),
                                                         (g.unsqueeze(-1) * grad_c_k).reshape(-1, cf.shape[1]))
        grad_codebook = grad_codebook.to(codebook.dtype)
    return grad_z, grad_codebook, None, None, None


torch.library.register_autograd("quantkit::nearest_codeword", _nearest_codeword_backward,
                                setup_context=_nearest_codeword_setup_context)


def nearest_codeword(z: Tensor, codebook: Tensor, metric: str = "l2", k: int = 1) -> NearestCodewords:
    """The ``k`` nearest codewords of every row of ``z``, without building the N x K distance matrix.

    Args:
        z: (N, D) float32 / float16 / bfloat16 / float64 vectors, any strides.
        codebook: (K, D) codewords on the same device.
        metric: "l2" (squared Euclidean), "cosine" (1 - cosine similarity) or "dot" (negated dot product);
            smaller is nearer for all three.
        k: number of neighbours, 1 <= k <= K.

    Returns:
        ``NearestCodewords(indices, distances)``: int64 indices and float32 distances (float64 for float64 input),
        shape (N,) when ``k == 1`` else (N, k) sorted by ascending distance. Ties go to the lowest index. Returned
        distances are recomputed directly from z and the chosen codeword, so l2 distances are never negative.

    Exactness: z and the codebook are first moved into a frame centred on the codebook (m, the mean of up to 256
    evenly spaced codewords; for cosine, the unit vectors centred on the unit sphere), then ranked with the
    expanded form accumulated in float32 (float64 for float64 input). The returned codeword's true distance is
    within ``8 u max(1, sqrt(D / 16)) (||z - m||^2 + ||c - m||^2)`` of the best one's (u = 2**-24, or 2**-53 for
    float64; half of that on the centred unit vectors for cosine), so a large common mean costs no precision:
    the bound scales with the data's spread, not its offset. ``dot`` ranks with the raw vectors.
    The distances are differentiable w.r.t. z and the codebook.
    """
    _check_pair("nearest_codeword", z, codebook)
    code = _metric_code("nearest_codeword", metric)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= codebook.shape[0]:
        raise ValueError(f"nearest_codeword: k must be an int in [1, K={codebook.shape[0]}], got {k!r}")
    if k > _CUDA_MAX_K and z.is_cuda and _ext.has_kernel("nearest_codeword", "CUDA"):
        raise ValueError(f"nearest_codeword: the CUDA kernel supports k <= {_CUDA_MAX_K}, got k={k}; run this search "
                         "on the CPU or with a smaller k")
    if _values_checked_in_python():
        _check_finite("nearest_codeword", "z", z)
        _check_finite("nearest_codeword", "codebook", codebook)
    dtype = _common_dtype(z, codebook)
    if z.is_cuda and code != _DOT:  # the CUDA kernel takes the frame from here (a copy at HBM bandwidth)
        acc = _compute_dtype(dtype)
        centre = _codebook_centre(codebook, unit=code == _COSINE)  # (D,) float64
        z_frame, c_frame, bias, _ = _ranking_frame(z.detach(), codebook.detach(), code, centre, acc)
        if code == _COSINE:  # the per-code bias rides in one extra column against a column of ones
            z_frame = torch.cat([z_frame, z_frame.new_ones(z_frame.shape[0], 1)], dim=1)
            c_frame = torch.cat([c_frame, bias[:, None]], dim=1)
            indices, _ = torch.ops.quantkit.nearest_codeword.default(z_frame, c_frame, _DOT, k)
            distances = _codeword_distance(z.to(acc), codebook.to(acc)[indices], _COSINE)
        else:  # l2 distances are translation invariant: the frame's are the op's (and differentiable)
            m = centre.to(acc)
            indices, distances = torch.ops.quantkit.nearest_codeword.default(z.to(acc) - m, codebook.to(acc) - m,
                                                                              code, k)
    else:  # the CPU kernel (and the reference) build the frame themselves
        indices, distances = torch.ops.quantkit.nearest_codeword.default(z.to(dtype), codebook.to(dtype), code, k,
                                                                          code != _DOT)
    if k == 1:
        return NearestCodewords(indices.squeeze(1), distances.squeeze(1))
    return NearestCodewords(indices, distances)


# ----------------------------------------------------------------------------------------------------------------
# soft_assign


def _soft_logits(rows: Tensor, codebook: Tensor, half_sq_norm: Tensor | None, temperature: Tensor) -> Tensor:
    """(n, K) logits, -||z - c||^2 / t up to a per-row constant (l2) or z.c / t (dot)."""
    score = rows @ codebook.T
    if half_sq_norm is not None:
        score = 2.0 * (score - half_sq_norm)
    return score / temperature


def soft_assign_reference(z: Tensor, codebook: Tensor, temperature: Tensor, metric: int) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch reference of ``quantkit::soft_assign``: (softmax(logits) @ codebook in z's dtype, lse (N,))."""
    _check_soft_values(z, codebook, temperature)
    acc = _compute_dtype(z.dtype)
    zf, cf, t = z.to(acc), codebook.to(acc), temperature.to(acc)
    half_sq_norm = 0.5 * cf.square().sum(-1) if metric == _L2 else None
    out = torch.empty_like(zf)
    lse = torch.empty(zf.shape[0], dtype=acc, device=z.device)
    step = _row_chunk(cf.shape[0])
    for start in range(0, zf.shape[0], step):
        logits = _soft_logits(zf[start:start + step], cf, half_sq_norm, t)  # (n, K)
        lse[start:start + step] = torch.logsumexp(logits, dim=1)
        out[start:start + step] = torch.softmax(logits, dim=1) @ cf
    return out.to(z.dtype), lse


def soft_assign_backward_reference(grad_out, z, codebook, temperature, out, lse, metric):
    """Reference backward: recomputes P = exp(logits - lse) per row chunk (never the whole N x K)."""
    acc = _compute_dtype(z.dtype)
    zf, cf, t, g, o = (x.to(acc) for x in (z, codebook, temperature, grad_out, out))
    half_sq_norm = 0.5 * cf.square().sum(-1) if metric == _L2 else None
    scale = 2.0 if metric == _L2 else 1.0  # d logits / d (z.c), times t
    grad_z = torch.empty_like(zf)
    grad_c = torch.zeros_like(cf)
    grad_t = torch.zeros((), dtype=acc, device=z.device)
    step = _row_chunk(cf.shape[0])
    for start in range(0, zf.shape[0], step):
        rows, g_rows = zf[start:start + step], g[start:start + step]  # (n, D)
        logits = _soft_logits(rows, cf, half_sq_norm, t)  # (n, K)
        p = torch.exp(logits - lse[start:start + step, None])
        grad_p = g_rows @ cf.T  # (n, K)
        delta = (g_rows * o[start:start + step]).sum(-1, keepdim=True)  # (n, 1)
        grad_logits = p * (grad_p - delta)  # (n, K)
        grad_z[start:start + step] = (scale / t) * (grad_logits @ cf)
        grad_c += p.T @ g_rows + (scale / t) * (grad_logits.T @ rows)
        if metric == _L2:
            grad_c -= (scale / t) * grad_logits.sum(0)[:, None] * cf
        grad_t -= (grad_logits * logits).sum() / t
    return grad_z.to(z.dtype), grad_c.to(codebook.dtype), grad_t.to(temperature.dtype)


def _check_soft_values(z: Tensor, codebook: Tensor, temperature: Tensor) -> None:
    _check_finite("soft_assign", "z", z)
    _check_finite("soft_assign", "codebook", codebook)
    value = float(temperature.detach())
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"soft_assign: temperature must be a finite positive number, got {value}")


@torch.library.impl(_lib, "soft_assign", "CompositeExplicitAutograd")
def _soft_assign_composite(z, codebook, temperature, metric):
    return soft_assign_reference(z, codebook, temperature, metric)


@torch.library.impl(_lib, "soft_assign_backward", "CompositeExplicitAutograd")
def _soft_assign_backward_composite(grad_out, z, codebook, temperature, out, lse, metric):
    return soft_assign_backward_reference(grad_out, z, codebook, temperature, out, lse, metric)


@torch.library.register_fake("quantkit::soft_assign")
def _soft_assign_fake(z, codebook, temperature, metric):
    torch._check(z.dim() == 2 and codebook.dim() == 2 and z.shape[1] == codebook.shape[1])
    return torch.empty_like(z), z.new_empty((z.shape[0],), dtype=_compute_dtype(z.dtype))


@torch.library.register_fake("quantkit::soft_assign_backward")
def _soft_assign_backward_fake(grad_out, z, codebook, temperature, out, lse, metric):
    return torch.empty_like(z), torch.empty_like(codebook), torch.empty_like(temperature)


def _soft_assign_setup_context(ctx, inputs, output):
    z, codebook, temperature, metric = inputs
    ctx.metric = metric
    ctx.save_for_backward(z, codebook, temperature, *output)


def _soft_assign_backward(ctx, grad_out, grad_lse):
    z, codebook, temperature, out, lse = ctx.saved_tensors
    grads = torch.ops.quantkit.soft_assign_backward.default(grad_out.contiguous(), z, codebook, temperature, out,
                                                            lse, ctx.metric)
    return (*grads, None)


torch.library.register_autograd("quantkit::soft_assign", _soft_assign_backward, setup_context=_soft_assign_setup_context)


def soft_assign(z: Tensor, codebook: Tensor, temperature: float | Tensor = 1.0, metric: str = "l2") -> Tensor:
    """Soft vector quantization (SoftVQ-VAE, arXiv:2412.10958): ``softmax(-d(z, C) / temperature) @ C``.

    Computed with an online softmax over codebook tiles (FlashAttention-style), so the N x K matrix is never held;
    the fused backward recomputes it tile by tile and returns gradients for z, the codebook and the temperature.

    Args:
        z: (N, D) float vectors. codebook: (K, D).
        temperature: positive float or 0-dim tensor (learnable when it requires grad).
        metric: "l2" (logits -||z - c||^2 / t), "dot" (z.c / t) or "cosine" (cos(z, c) / t over the
            l2-normalized codebook, which is then also what is averaged).

    Returns:
        (N, D) tensor in z's dtype.
    """
    _check_pair("soft_assign", z, codebook)
    code = _metric_code("soft_assign", metric)
    if not isinstance(temperature, Tensor):
        if not isinstance(temperature, (int, float)) or not temperature > 0 or temperature == float("inf"):
            raise ValueError(f"soft_assign: temperature must be a finite positive number, got {temperature!r}")
        temperature = torch.tensor(float(temperature), dtype=_compute_dtype(z.dtype), device=z.device)
    elif temperature.numel() != 1:
        raise ValueError(f"soft_assign: temperature must be a scalar, got shape {tuple(temperature.shape)}")
    dtype = _common_dtype(z, codebook)
    max_dim = _CUDA_SOFT_ASSIGN_MAX_BYTES // (8 if dtype == torch.float64 else 4)
    if z.shape[1] > max_dim and z.is_cuda and _ext.has_kernel("soft_assign", "CUDA"):
        raise ValueError(f"soft_assign: the CUDA kernel supports D <= {max_dim} for {dtype}, got D={z.shape[1]}")
    z, codebook = z.to(dtype), codebook.to(dtype)
    temperature = temperature.reshape(()).to(_compute_dtype(dtype))
    if _values_checked_in_python():
        _check_soft_values(z, codebook, temperature)
    if code == _COSINE:
        z = torch.nn.functional.normalize(z, dim=-1, eps=_COSINE_EPS)
        codebook = torch.nn.functional.normalize(codebook, dim=-1, eps=_COSINE_EPS)
        code = _DOT
    if code == _L2:
        # softmax(-|z - c|^2 / t) @ C is translation-equivariant: computed about the codebook's centre m (see
        # _codebook_centre) and moved back, its error scales with the spread of the data, not its offset. m is a
        # constant for autograd; the result (and so every gradient) does not depend on it.
        acc = _compute_dtype(dtype)
        centre = _codebook_centre(codebook, "soft_assign").to(acc)
        out = torch.ops.quantkit.soft_assign.default(z.to(acc) - centre, codebook.to(acc) - centre, temperature,
                                                     code)[0]
        return (out + centre).to(dtype)
    return torch.ops.quantkit.soft_assign.default(z, codebook, temperature, code)[0]


# Under autocast both ops run in float32 (their accuracy contract is stated for float32 accumulation): autocast
# would otherwise lower the references' matmuls to bfloat16 and flip near-tie indices.
for _op in ("quantkit::nearest_codeword", "quantkit::soft_assign"):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(_op, _device, torch.float32)

# Load the compiled kernels last: they register implementations for the schemas defined above.
_ext._load()

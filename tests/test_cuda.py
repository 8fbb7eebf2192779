"""CUDA kernels of quantkit's ops against float64 brute force and the pure-PyTorch references.

Every test carries the `cuda` marker (conftest.py skips them without a GPU) and also skips when the extension has
no CUDA kernel for the op, asked of the dispatcher, so that a reference running on a GPU is never mistaken for the
kernel. The exactness rule checked for nearest_codeword (issue 2): the returned codeword's true distance, computed
directly in float64, is within a tolerance of the best codeword's; exact index equality is required only where the
data guarantees it (float64, duplicated codewords, well-separated codebooks).
"""
import math

import pytest
import torch

from quantkit import _ext, ops

pytestmark = pytest.mark.cuda

METRICS = ("l2", "cosine", "dot")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# (N, D, K): N = 1, K = 1, K and D off every tile multiple (64 codes, 16 / 32 deep), D = 1, a few thousand codes.
SHAPES = [(1, 1, 1), (1, 7, 200), (37, 5, 3), (129, 8, 70), (300, 33, 1000), (64, 257, 65), (2000, 16, 4099)]
EPS = 1e-12


def _needs_kernel(op):
    if not torch.cuda.is_available() or not _ext.has_kernel(op, "CUDA"):
        pytest.skip(f"quantkit::{op} has no CUDA kernel in this build")


@pytest.fixture
def exact_mode(monkeypatch):
    monkeypatch.delenv("QUANTKIT_CUDA_NEAREST", raising=False)


def _unit(dtype):
    """Unit roundoff of the accumulation: float32 for every input dtype but float64."""
    return 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24


def _true_distances(z, codebook, metric):
    """(N, K) float64 distances computed directly, on the inputs as the kernel sees them (already rounded)."""
    z64, c64 = z.double().cpu(), codebook.double().cpu()
    if metric == "l2":  # direct form, a row chunk at a time (N x K x D would not fit for the larger shapes)
        step = max(1, 2 ** 22 // max(1, c64.numel()))
        return torch.cat([(z64[i:i + step, None, :] - c64[None]).square().sum(-1)
                          for i in range(0, z64.shape[0], step)])
    dot = z64 @ c64.T
    if metric == "dot":
        return -dot
    return 1.0 - dot / (z64.norm(dim=1, keepdim=True).clamp_min(EPS) * c64.norm(dim=1).clamp_min(EPS))


def _tolerance(z, codebook, metric, dtype):
    """Per-row slack of the exactness rule: a few ulps of the expanded form's magnitude (kernels.md section 5)."""
    z64, c64 = z.double().cpu(), codebook.double().cpu()
    dim = max(z.shape[1], 1)
    u = _unit(dtype) * (1 + math.sqrt(dim))
    if metric == "cosine":
        return torch.full((z.shape[0],), 32 * u)
    return 32 * u * (z64.square().sum(1) + c64.square().sum(1).max()) + 1e-300


def _check_exactness(z, codebook, metric, k, indices, distances, dtype):
    true = _true_distances(z, codebook, metric)  # (N, K)
    best = true.sort(dim=1).values[:, :k]  # (N, k)
    idx = indices.reshape(z.shape[0], k).cpu()
    got = true.gather(1, idx)  # (N, k): true distance of what was returned
    tol = _tolerance(z, codebook, metric, dtype)[:, None]
    assert (got - best <= tol).all(), f"max excess {(got - best - tol).max().item():.3g}"
    # distinct codes per row, in ascending order (up to the same slack)
    if k > 1:
        assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()
        assert (got.diff(dim=1) >= -tol).all()
    # returned distances are the direct distances of the returned codes
    dist = distances.reshape(z.shape[0], k).double().cpu()
    assert torch.allclose(dist, got, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=float(tol.max()))
    if metric == "l2":
        assert (dist >= 0).all()


def _data(n, d, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen).to(dtype).cuda()
    codebook = torch.randn(k, d, generator=gen).to(dtype).cuda()
    return z, codebook


# ---------------------------------------------------------------------------------------------------------------
# nearest_codeword


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nearest_returns_a_codeword_within_tolerance_of_the_best(shape, dtype, metric, exact_mode):
    _needs_kernel("nearest_codeword")
    n, d, k = shape
    z, codebook = _data(n, d, k, dtype)
    result = ops.nearest_codeword(z, codebook, metric)
    assert result.indices.shape == (n,) and result.indices.dtype == torch.int64 and result.indices.is_cuda
    assert result.distances.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _check_exactness(z, codebook, metric, 1, result.indices, result.distances, dtype)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [2, 5, 32])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
def test_nearest_k_returns_the_k_best_in_ascending_order(k, metric, dtype, exact_mode):
    _needs_kernel("nearest_codeword")
    z, codebook = _data(257, 19, 300, dtype, seed=1)
    result = ops.nearest_codeword(z, codebook, metric, k=k)
    assert result.indices.shape == (257, k)
    _check_exactness(z, codebook, metric, k, result.indices, result.distances, dtype)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 3, 32])
def test_nearest_float64_matches_the_reference_index_for_index(k, metric, exact_mode):
    _needs_kernel("nearest_codeword")
    z, codebook = _data(500, 12, 777, torch.float64, seed=2)
    got = ops.nearest_codeword(z, codebook, metric, k=k)
    want_idx, want_dist = ops.nearest_codeword_reference(z.cpu(), codebook.cpu(), ops.METRICS[metric], k)
    assert torch.equal(got.indices.reshape(500, k).cpu(), want_idx)
    assert torch.allclose(got.distances.reshape(500, k).cpu(), want_dist, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("copies", [4, 50])  # 50 copies, K = 2000, 20 rows: k == 1 splits the codebook over blocks
def test_nearest_ties_go_to_the_lowest_index_on_every_run(metric, k, copies, exact_mode):
    _needs_kernel("nearest_codeword")
    gen = torch.Generator().manual_seed(3)
    base = 10 * torch.randn(40, 6, generator=gen)  # well separated: no near-ties inside base
    codebook = base.repeat(copies, 1).cuda()  # code i, i + 40, i + 80, ... are identical
    z = torch.cat([base[:10] + 0.1 * torch.randn(10, 6, generator=gen), base[10:20]]).cuda()  # incl. z == c
    want = ops.nearest_codeword_reference(z.double().cpu(), base.double(), ops.METRICS[metric], 1)[0][:, 0]
    first = ops.nearest_codeword(z, codebook, metric, k=k)
    idx = first.indices.reshape(20, k).cpu()
    # the k nearest are the k copies of the best base code, lowest index first
    expected = want[:, None] + 40 * torch.arange(k)[None, :]
    assert torch.equal(idx, expected)
    for _ in range(3):
        again = ops.nearest_codeword(z, codebook, metric, k=k)
        assert torch.equal(again.indices, first.indices) and torch.equal(again.distances, first.distances)


@pytest.mark.parametrize("k", [1, 7])
def test_nearest_identical_codewords_return_the_first_indices(k, exact_mode):
    _needs_kernel("nearest_codeword")
    codebook = torch.ones(130, 3, device="cuda")  # K > 2 tiles, all tied
    z = torch.randn(70, 3, device="cuda")
    result = ops.nearest_codeword(z, codebook, "l2", k=k)
    assert torch.equal(result.indices.reshape(70, k).cpu(), torch.arange(k).expand(70, k))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", ["random", "large_k", "near_duplicates", "duplicates", "offset"])
def test_nearest_fast_mode_returns_the_exact_mode_index(case, dtype, metric, monkeypatch):
    """The fast mode re-ranks every candidate within its error bound with the exact arithmetic: same answer."""
    _needs_kernel("nearest_codeword")
    gen = torch.Generator().manual_seed(4)
    if case == "random":
        z, codebook = torch.randn(3000, 32, generator=gen), torch.randn(1000, 32, generator=gen)
    elif case == "large_k":
        z, codebook = torch.randn(1024, 8, generator=gen), torch.randn(20000, 8, generator=gen)
    elif case == "near_duplicates":  # clusters of 8 codes 1e-4 apart (kernels.md section 5): many survivors
        centers = 6 * torch.randn(64, 16, generator=gen)
        codebook = (centers[:, None, :] + 1e-4 * torch.randn(64, 8, 16, generator=gen)).reshape(-1, 16)
        z = centers[torch.randint(0, 64, (700,), generator=gen)] + 1e-4 * torch.randn(700, 16, generator=gen)
    elif case == "duplicates":  # 40 copies of every code: more survivors than slots, so the fallback runs
        codebook = torch.randn(30, 10, generator=gen).repeat(40, 1)
        z = torch.randn(500, 10, generator=gen)
    else:  # large common offset: the expanded form's cancellation (pytorch#42479-style)
        codebook = 500.0 + torch.randn(600, 24, generator=gen)
        z = 500.0 + torch.randn(800, 24, generator=gen)
    z, codebook = z.to(dtype).cuda(), codebook.to(dtype).cuda()
    monkeypatch.delenv("QUANTKIT_CUDA_NEAREST", raising=False)
    exact = ops.nearest_codeword(z, codebook, metric)
    monkeypatch.setenv("QUANTKIT_CUDA_NEAREST", "fast")
    fast = ops.nearest_codeword(z, codebook, metric)
    assert torch.equal(fast.indices, exact.indices)
    assert torch.equal(fast.distances, exact.distances)
    _check_exactness(z, codebook, metric, 1, fast.indices, fast.distances, dtype)


def test_nearest_fast_mode_leaves_k_above_one_and_float64_exact(monkeypatch):
    _needs_kernel("nearest_codeword")
    z, codebook = _data(300, 9, 500, torch.float64, seed=5)
    monkeypatch.setenv("QUANTKIT_CUDA_NEAREST", "fast")
    fast64 = ops.nearest_codeword(z, codebook, "l2", k=1)
    z32, c32 = z.float(), codebook.float()
    fast_k = ops.nearest_codeword(z32, c32, "l2", k=4)
    monkeypatch.delenv("QUANTKIT_CUDA_NEAREST")
    assert torch.equal(fast64.indices, ops.nearest_codeword(z, codebook, "l2", k=1).indices)
    assert torch.equal(fast_k.indices, ops.nearest_codeword(z32, c32, "l2", k=4).indices)


def test_nearest_accepts_non_contiguous_inputs(exact_mode):
    _needs_kernel("nearest_codeword")
    z_t = torch.randn(24, 150, device="cuda").T  # (150, 24), strides (1, 150)
    codebook = torch.randn(300, 48, device="cuda")[:, ::2]  # (300, 24), every other column
    assert not z_t.is_contiguous() and not codebook.is_contiguous()
    got = ops.nearest_codeword(z_t, codebook, "l2", k=3)
    want = ops.nearest_codeword(z_t.contiguous(), codebook.contiguous(), "l2", k=3)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.distances, want.distances)


def test_nearest_handles_empty_z():
    _needs_kernel("nearest_codeword")
    result = ops.nearest_codeword(torch.empty(0, 5, device="cuda"), torch.randn(9, 5, device="cuda"), k=2)
    assert result.indices.shape == (0, 2) and result.distances.shape == (0, 2)


def test_nearest_runs_on_the_current_stream(exact_mode):
    _needs_kernel("nearest_codeword")
    z, codebook = _data(4096, 16, 2048, torch.float32, seed=6)
    want = ops.nearest_codeword(z, codebook)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ops.nearest_codeword(z, codebook)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got.indices, want.indices)


def test_nearest_never_allocates_n_by_k(exact_mode):
    _needs_kernel("nearest_codeword")
    n, d, k = 65536, 8, 65536  # N x K float32 would be 16 GiB
    z, codebook = torch.randn(n, d, device="cuda"), torch.randn(k, d, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = ops.nearest_codeword(z, codebook)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 64 * 2 ** 20, f"{extra / 2 ** 20:.1f} MiB"
    assert result.indices.shape == (n,)


@pytest.mark.parametrize("where, message", [("z", "z contains NaN"), ("codebook", "codebook contains NaN")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nearest_rejects_non_finite_input_naming_the_argument(where, message, bad):
    _needs_kernel("nearest_codeword")
    z, codebook = _data(100, 4, 50, torch.float32)
    (z if where == "z" else codebook)[7, 2] = bad
    with pytest.raises((RuntimeError, ValueError), match=message):
        ops.nearest_codeword(z, codebook)


def test_nearest_rejects_k_above_the_kernel_limit():
    _needs_kernel("nearest_codeword")
    z, codebook = _data(10, 4, 100, torch.float32)
    with pytest.raises(ValueError, match="k <= 32"):
        ops.nearest_codeword(z, codebook, k=33)


def test_nearest_rejects_mixed_devices():
    _needs_kernel("nearest_codeword")
    with pytest.raises(ValueError, match="same device"):
        ops.nearest_codeword(torch.randn(3, 4, device="cuda"), torch.randn(5, 4))


def test_nearest_distances_gradient_matches_the_reference(exact_mode):
    _needs_kernel("nearest_codeword")
    z, codebook = _data(60, 5, 40, torch.float64, seed=7)
    z.requires_grad_(True), codebook.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b: ops.nearest_codeword(a, b, "l2", k=3).distances, (z, codebook))


# ---------------------------------------------------------------------------------------------------------------
# soft_assign

SOFT_SHAPES = [(1, 1, 1), (37, 5, 3), (130, 33, 70), (64, 100, 300), (20, 1100, 90)]  # D = 1100: 1-row blocks (fp32)


def _soft_reference(z, codebook, temperature, metric):
    """float64 CPU reference of ops.soft_assign on the inputs as given (cosine normalizes first, as the wrapper)."""
    z64, c64 = z.double().cpu(), codebook.double().cpu()
    code = ops.METRICS[metric]
    if metric == "cosine":
        z64 = torch.nn.functional.normalize(z64, dim=-1, eps=EPS)
        c64 = torch.nn.functional.normalize(c64, dim=-1, eps=EPS)
        code = ops.METRICS["dot"]
    return ops.soft_assign_reference(z64, c64, torch.tensor(temperature, dtype=torch.float64), code)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SOFT_SHAPES, ids=str)
def test_soft_assign_matches_the_float64_reference(shape, dtype, metric):
    _needs_kernel("soft_assign")
    n, d, k = shape
    z, codebook = _data(n, d, k, dtype, seed=8)
    temperature = 0.7 * d if metric == "l2" else 0.5  # keep the softmax neither one-hot nor uniform
    got = ops.soft_assign(z, codebook, temperature, metric)
    want, _ = _soft_reference(z, codebook, temperature, metric)
    assert got.dtype == dtype and got.shape == (n, d)
    tol = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert torch.allclose(got.double().cpu(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("metric", ("l2", "dot"))
def test_soft_assign_lse_matches_the_reference(metric):
    _needs_kernel("soft_assign")
    z, codebook = _data(200, 24, 333, torch.float32, seed=9)
    t = torch.tensor(3.0, device="cuda")
    out, lse = torch.ops.quantkit.soft_assign.default(z, codebook, t, ops.METRICS[metric])
    want_out, want_lse = ops.soft_assign_reference(z.double().cpu(), codebook.double().cpu(), t.double().cpu(),
                                                   ops.METRICS[metric])
    assert lse.dtype == torch.float32 and lse.shape == (200,)
    assert torch.allclose(lse.double().cpu(), want_lse, rtol=1e-5, atol=1e-4)
    assert torch.allclose(out.double().cpu(), want_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ("l2", "dot"))
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 5, 3), (130, 33, 70), (9, 700, 20)], ids=str)  # 700: f64 1-row
def test_soft_assign_backward_matches_the_reference_in_float64(shape, metric):
    _needs_kernel("soft_assign_backward")
    n, d, k = shape
    z, codebook = _data(n, d, k, torch.float64, seed=10)
    t = torch.tensor(0.9 * d if metric == "l2" else 0.8, dtype=torch.float64, device="cuda")
    code = ops.METRICS[metric]
    out, lse = torch.ops.quantkit.soft_assign.default(z, codebook, t, code)
    grad_out = torch.randn(n, d, dtype=torch.float64, device="cuda")
    got = torch.ops.quantkit.soft_assign_backward.default(grad_out, z, codebook, t, out, lse, code)
    cpu = [x.cpu() for x in (grad_out, z, codebook, t, out, lse)]
    want = ops.soft_assign_backward_reference(*cpu, code)
    for name, g, w in zip(("grad_z", "grad_codebook", "grad_temperature"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert torch.allclose(g.cpu(), w, rtol=1e-9, atol=1e-11), name


@pytest.mark.parametrize("metric", METRICS)
def test_soft_assign_gradcheck_on_cuda(metric):
    _needs_kernel("soft_assign_backward")
    z, codebook = _data(6, 3, 70, torch.float64, seed=11)  # K = 70: two code tiles
    t = torch.tensor(1.3, dtype=torch.float64, device="cuda")
    for x in (z, codebook, t):
        x.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b, c: ops.soft_assign(a, b, c, metric), (z, codebook, t))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_soft_assign_backward_is_bitwise_deterministic(dtype):
    _needs_kernel("soft_assign_backward")
    z, codebook = _data(3000, 40, 500, dtype, seed=12)
    t = torch.tensor(20.0, device="cuda")
    out, lse = torch.ops.quantkit.soft_assign.default(z, codebook, t, 0)
    grad_out = torch.randn_like(out)
    first = torch.ops.quantkit.soft_assign_backward.default(grad_out, z, codebook, t, out, lse, 0)
    for _ in range(3):
        again = torch.ops.quantkit.soft_assign_backward.default(grad_out, z, codebook, t, out, lse, 0)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_soft_assign_float32_gradients_match_float64():
    _needs_kernel("soft_assign_backward")
    z64, c64 = _data(500, 16, 256, torch.float64, seed=13)
    grads = []
    for dtype in (torch.float64, torch.float32):
        z, c = z64.detach().to(dtype).requires_grad_(True), c64.detach().to(dtype).requires_grad_(True)
        t = torch.tensor(8.0, dtype=dtype, device="cuda", requires_grad=True)
        ops.soft_assign(z, c, t).square().sum().backward()
        grads.append([x.grad.double().cpu() for x in (z, c, t)])
    for g64, g32 in zip(*grads):
        assert torch.allclose(g32, g64, rtol=1e-3, atol=1e-3 * g64.abs().max().item())


@pytest.mark.parametrize("where, message", [("z", "z contains NaN"), ("codebook", "codebook contains NaN")])
@pytest.mark.parametrize("caller", ["wrapper", "kernel"])
def test_soft_assign_rejects_non_finite_input_naming_the_argument(where, message, caller):
    _needs_kernel("soft_assign")
    if caller == "kernel" and not ops._KERNEL_ERRORS_RAISE:
        pytest.skip("this torch crashes on errors thrown inside kernels (the wrapper checks first)")
    z, codebook = _data(50, 4, 20, torch.float32)
    (z if where == "z" else codebook)[3, 1] = float("nan")
    with pytest.raises((RuntimeError, ValueError), match=message):
        if caller == "wrapper":
            ops.soft_assign(z, codebook, 1.0)
        else:
            torch.ops.quantkit.soft_assign.default(z, codebook, torch.tensor(1.0, device="cuda"), 0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_soft_assign_rejects_a_bad_temperature_tensor(bad):
    _needs_kernel("soft_assign")
    z, codebook = _data(50, 4, 20, torch.float32)
    with pytest.raises((RuntimeError, ValueError), match="temperature"):
        ops.soft_assign(z, codebook, torch.tensor(bad, device="cuda"))


def test_soft_assign_handles_empty_z():
    _needs_kernel("soft_assign")
    z = torch.empty(0, 6, device="cuda", requires_grad=True)
    codebook = torch.randn(10, 6, device="cuda", requires_grad=True)
    out = ops.soft_assign(z, codebook, 1.0)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert torch.equal(codebook.grad, torch.zeros_like(codebook))


# ---------------------------------------------------------------------------------------------------------------
# registration: opcheck and torch.compile on CUDA tensors


def test_opcheck_nearest_codeword_on_cuda():
    _needs_kernel("nearest_codeword")
    z, codebook = _data(33, 6, 70, torch.float32, seed=14)
    for metric in (0, 1, 2):
        for k in (1, 4):
            torch.library.opcheck(torch.ops.quantkit.nearest_codeword.default, (z, codebook, metric, k))


def test_opcheck_soft_assign_on_cuda():
    _needs_kernel("soft_assign")
    z, codebook = _data(21, 5, 70, torch.float64, seed=15)
    z.requires_grad_(True), codebook.requires_grad_(True)
    t = torch.tensor(1.5, dtype=torch.float64, device="cuda", requires_grad=True)
    for metric in (0, 2):
        torch.library.opcheck(torch.ops.quantkit.soft_assign.default, (z, codebook, t, metric))
        out, lse = torch.ops.quantkit.soft_assign.default(z.detach(), codebook.detach(), t.detach(), metric)
        grad_out = torch.randn_like(out)
        torch.library.opcheck(torch.ops.quantkit.soft_assign_backward.default,
                              (grad_out, z.detach(), codebook.detach(), t.detach(), out, lse, metric))


def test_torch_compile_fullgraph_on_cuda(exact_mode):
    _needs_kernel("nearest_codeword")
    _needs_kernel("soft_assign")

    def step(z, codebook):
        nearest = ops.nearest_codeword(z, codebook, "l2")
        soft = ops.soft_assign(z, codebook, 2.0, "l2")
        return nearest.indices, nearest.distances.sum() + soft.square().sum()

    z, codebook = _data(300, 16, 500, torch.float32, seed=16)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z.requires_grad_(True)
    idx, loss = compiled(z, codebook)
    loss.backward()
    want_idx, want_loss = step(z.detach(), codebook)
    assert torch.equal(idx, want_idx)
    assert torch.allclose(loss, want_loss, rtol=1e-5)
    assert z.grad is not None and torch.isfinite(z.grad).all()

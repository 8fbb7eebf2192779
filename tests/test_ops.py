"""Tests of quantkit's ops: the fused CPU kernels (when built) and the pure-PyTorch references behind them.

Every property holds for both implementations, so the suite runs as-is with the extension and with
QUANTKIT_DISABLE_EXT=1; checks that only make sense for a compiled kernel ask the dispatcher first.
Exactness is judged against a float64 brute force by true distance, within the documented tolerance
8 * 2**-24 * (|z|^2 + |c|^2), never by index equality alone (see quantkit.ops.nearest_codeword).
"""
import pytest
import torch
from hypothesis import given, strategies as st

from quantkit import _ext, ops

HAS_NEAREST = _ext.has_kernel("nearest_codeword", "CPU")
HAS_SOFT = _ext.has_kernel("soft_assign", "CPU") and _ext.has_kernel("soft_assign_backward", "CPU")
needs_kernel = pytest.mark.skipif(not (HAS_NEAREST and HAS_SOFT), reason="compiled CPU kernels not loaded")
METRICS = ["l2", "cosine", "dot"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
U32 = 2.0 ** -24


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _true_distances(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, K) float64 distances computed directly (no expansion)."""
    z, c = z.double(), codebook.double()
    if metric == "l2":
        return (z[:, None, :] - c[None, :, :]).square().sum(-1)
    dot = z @ c.T
    if metric == "dot":
        return -dot
    norms = z.norm(dim=1, keepdim=True).clamp_min(1e-12) * c.norm(dim=1).clamp_min(1e-12)
    return 1.0 - dot / norms


def _tolerance(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, K) documented ranking tolerance: 8 u (|z|^2 + |c|^2), on unit vectors for cosine (u of the compute type)."""
    u = 2.0 ** -53 if z.dtype == torch.float64 else U32
    if metric == "cosine":
        return torch.full((z.shape[0], codebook.shape[0]), 16 * u, dtype=torch.float64)
    zz, cc = z.double().square().sum(1), codebook.double().square().sum(1)
    return 8 * u * (zz[:, None] + cc[None, :]) + 1e-300


def _assert_optimal(z, codebook, metric, k, indices, distances):
    """The k returned codes are distinct, sorted, and each is within tolerance of the true j-th best."""
    n, K = z.shape[0], codebook.shape[0]
    assert indices.shape == (n, k) and indices.dtype == torch.int64
    assert distances.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    if n == 0:
        return
    assert int(indices.min()) >= 0 and int(indices.max()) < K
    assert all(len(set(row)) == k for row in indices.tolist()), "indices repeat within a row"
    true = _true_distances(z, codebook, metric)  # (N, K)
    tol = _tolerance(z, codebook, metric)
    best = true.sort(dim=1).values[:, :k]  # (N, k) true j-th best
    chosen = true.gather(1, indices)  # (N, k)
    slack = tol.gather(1, indices) + tol.max(dim=1, keepdim=True).values
    assert bool((chosen <= best + slack).all()), f"not the nearest within tolerance: {(chosen - best).max()}"
    assert bool((chosen[:, 1:] >= chosen[:, :-1] - slack[:, 1:]).all()), "neighbours are not sorted"
    # returned distances are the directly computed ones (never negative for l2)
    torch.testing.assert_close(distances.double(), chosen, rtol=1e-5, atol=1e-5)
    if metric == "l2":
        assert bool((distances >= 0).all())


def _nearest(z, codebook, metric, k):
    out = ops.nearest_codeword(z, codebook, metric=metric, k=k)
    if k == 1:
        assert out.indices.dim() == 1
        return out.indices[:, None], out.distances[:, None]
    return out


def _maybe_strided(t: torch.Tensor, how: int) -> torch.Tensor:
    """0: contiguous, 1: every other column of a wider tensor, 2: a transposed (column-major) copy."""
    if how == 1:
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if how == 2:
        return t.T.contiguous().T
    return t


# ----------------------------------------------------------------------------------------------------------------
# nearest_codeword: exactness, ties, layouts


@given(n=st.integers(0, 70), K=st.integers(1, 90), D=st.sampled_from([1, 3, 5, 8, 13, 17, 33, 67]),
       metric=st.sampled_from(METRICS), dtype=st.sampled_from(DTYPES), k=st.integers(1, 4),
       layout=st.integers(0, 2), seed=st.integers(0, 2 ** 16))
def test_nearest_is_optimal_within_tolerance(n, K, D, metric, dtype, k, layout, seed):
    k = min(k, K)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=gen).to(dtype)
    codebook = torch.randn(K, D, generator=gen).to(dtype)
    z, codebook = _maybe_strided(z, layout), _maybe_strided(codebook, (layout + 1) % 3)
    indices, distances = _nearest(z, codebook, metric, k)
    _assert_optimal(z, codebook, metric, k, indices, distances)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(3, 16, 5000), (200, 8, 700)])  # few rows: K split over threads; many rows
def test_ties_go_to_lowest_index_for_any_thread_count(metric, shape):
    n, D, K = shape
    base = torch.randn(K // 7 + 1, D)
    codebook = base[torch.arange(K) % base.shape[0]]  # every codeword repeated about 7 times
    z = torch.randn(n, D)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(ops.nearest_codeword(z, codebook, metric=metric, k=3))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(results[0].indices, results[1].indices, rtol=0, atol=0)
    torch.testing.assert_close(results[0].distances, results[1].distances, rtol=0, atol=0)
    first = results[0].indices[:, 0]
    assert bool((first < base.shape[0]).all()), "a later duplicate won a tie"
    # the 2nd and 3rd neighbours of a repeated best codeword are its next copies, in index order
    copies = torch.stack([first, first + base.shape[0], first + 2 * base.shape[0]], dim=1)
    torch.testing.assert_close(results[0].indices, copies, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_z_equal_to_a_codeword_returns_it_at_distance_zero(dtype):
    codebook = torch.randn(300, 24, dtype=dtype)
    pick = torch.randperm(300)[:50]
    out = ops.nearest_codeword(codebook[pick], codebook)
    torch.testing.assert_close(out.indices, pick, rtol=0, atol=0)
    assert bool((out.distances == 0).all())


@pytest.mark.parametrize("offset", [1e3, 5e5])
def test_large_norm_offsets_stay_within_tolerance_and_nonnegative(offset):
    codebook = offset + torch.randn(500, 16)
    z = offset + torch.randn(64, 16)
    for metric in METRICS:
        indices, distances = _nearest(z, codebook, metric, 2)
        _assert_optimal(z, codebook, metric, 2, indices, distances)


def test_near_duplicate_codewords_distances_never_negative():
    centers = 6 * torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    codebook = (centers[:, None, :] + 1e-4 * torch.randn(20, 8, 8)).reshape(-1, 8)
    z = codebook[torch.randperm(160)[:40]] + 1e-5 * torch.randn(40, 8)
    indices, distances = _nearest(z, codebook, "l2", 4)
    _assert_optimal(z, codebook, "l2", 4, indices, distances)


@pytest.mark.skipif(not HAS_NEAREST, reason="compiled CPU kernel not loaded")
@pytest.mark.skipif(not HAS_NEAREST, reason="compiled CPU kernels not loaded")
@pytest.mark.parametrize("isa", ["default", "avx2", "baseline"])
@pytest.mark.parametrize("D", [8, 300, 600])  # the unrolled D = 8 path; wide rows scored in 2 and 3 slices
def test_specialized_kernel_paths_are_exact_and_tie_break_by_index(D, isa, monkeypatch):
    """The kernel's shape-specialized paths (a compile-time D = 8, and D > 256 scored in dimension slices with
    partial sums kept between slices) are exact, keep ties on the lowest index, and do not depend on threads."""
    if isa != "default":
        monkeypatch.setenv("QUANTKIT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(D)
    base = torch.randn(211, D, generator=gen)
    codebook = base[torch.arange(900) % 211]  # every codeword repeated 4-5 times: ties everywhere
    z = torch.randn(530, D, generator=gen)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append([_nearest(z, codebook, metric, k) for metric in METRICS for k in (1, 3)])
    finally:
        torch.set_num_threads(before)
    for (indices, distances), (indices2, distances2) in zip(*runs):
        assert torch.equal(indices, indices2) and torch.equal(distances, distances2)
    for metric_runs, metric in zip(zip(runs[0][0::2], runs[0][1::2]), METRICS):
        for k, (indices, distances) in zip((1, 3), metric_runs):
            _assert_optimal(z, codebook, metric, k, indices, distances)
            first = indices[:, 0]
            assert bool((first < 211).all()), f"{metric}, k={k}: a later duplicate won a tie"
    # float64 and a strided codebook take the packed-tile route through the same paths
    indices, distances = _nearest(z.double(), _maybe_strided(codebook.double(), 1), "l2", 1)
    _assert_optimal(z.double(), codebook.double(), "l2", 1, indices, distances)


@pytest.mark.parametrize("metric", METRICS)
def test_kernel_agrees_with_reference(metric):
    z, codebook = torch.randn(700, 40), torch.randn(1500, 40)
    got = torch.ops.quantkit.nearest_codeword(z, codebook, ops.METRICS[metric], 5)
    want = ops.nearest_codeword_reference(z, codebook, ops.METRICS[metric], 5)
    same = got[0] == want[0]
    assert same.float().mean() > 0.999
    torch.testing.assert_close(got[1][same], want[1][same], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (HAS_NEAREST and HAS_SOFT), reason="compiled CPU kernels not loaded")
@pytest.mark.parametrize("isa", ["avx2", "scalar", "baseline"])
def test_portable_instruction_set_paths_are_exact(isa, monkeypatch):
    """The kernels compiled for AVX2 and for the baseline ISA (forced with QUANTKIT_CPU_ISA) are exact too."""
    monkeypatch.setenv("QUANTKIT_CPU_ISA", isa)
    z, codebook = torch.randn(300, 19), torch.randn(777, 19)
    for metric in METRICS:
        indices, distances = _nearest(z, codebook, metric, 2)
        _assert_optimal(z, codebook, metric, 2, indices, distances)
    for dtype in (torch.float32, torch.float64):
        t = torch.tensor(0.5, dtype=dtype)
        out, lse = torch.ops.quantkit.soft_assign(z.to(dtype), codebook.to(dtype), t, 0)
        ref_out, ref_lse = ops.soft_assign_reference(z.to(dtype), codebook.to(dtype), t, 0)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
        grad = torch.randn_like(out)
        got = torch.ops.quantkit.soft_assign_backward(grad, z.to(dtype), codebook.to(dtype), t, out, lse, 0)
        want = ops.soft_assign_backward_reference(grad, z.to(dtype), codebook.to(dtype), t, out, lse, 0)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# precision on data with a large common mean (encoder features): bounds scale with the spread, not the offset


def _offset_data(n, K, D, offset_ratio, dtype, seed):
    """z and the codebook both drawn as offset + spread * randn, offset = offset_ratio * spread, rounded to dtype."""
    gen = torch.Generator().manual_seed(seed)
    spread = 10.0 ** float(torch.randint(-3, 3, (), generator=gen))
    if dtype == torch.float16:  # keep offset + spread * randn inside float16's range (65504)
        spread = min(spread, 1e3 / (1.0 + offset_ratio))
    offset = offset_ratio * spread * torch.randn(D, generator=gen).sign()  # a common mean of either sign per dim
    z = (offset + spread * torch.randn(n, D, generator=gen, dtype=torch.float64)).to(dtype)
    codebook = (offset + spread * torch.randn(K, D, generator=gen, dtype=torch.float64)).to(dtype)
    return z, codebook, spread


def _centred_tolerance(z, codebook, metric):
    """(N, K) documented bound: 8 u max(1, sqrt(D/16)) (|z - m|^2 + |c - m|^2) about the codebook centre m (on the
    unit vectors, halved, for cosine), u of the compute type."""
    u = 2.0 ** -53 if z.dtype == torch.float64 else U32
    z, c = z.double(), codebook.double()
    if metric == "cosine":
        z, c = ops._unit_rows(z), ops._unit_rows(c)
    m = ops._codebook_centre(c)
    zz, cc = (z - m).square().sum(1), (c - m).square().sum(1)
    tol = 8 * u * max(1.0, (z.shape[1] / 16) ** 0.5) * (zz[:, None] + cc[None, :])
    return (0.5 * tol if metric == "cosine" else tol) + 1e-300


@given(n=st.integers(1, 40), K=st.integers(1, 64), D=st.sampled_from([1, 2, 7, 16, 64, 300, 1024]),
       offset_ratio=st.sampled_from([0.0, 10.0, 1e2, 1e3, 1e4]), metric=st.sampled_from(["l2", "cosine"]),
       dtype=st.sampled_from(DTYPES), k=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_nearest_is_exact_on_data_with_a_large_common_mean(n, K, D, offset_ratio, metric, dtype, k, seed):
    """With a common offset up to 1e4 x the spread, every returned index is the float64 nearest within a bound
    relative to the spread (the expanded form without centring kept no digit here: 0% of rows at 3e4)."""
    k = min(k, K)
    z, codebook, _ = _offset_data(n, K, D, offset_ratio, dtype, seed)
    indices, distances = _nearest(z, codebook, metric, k)
    true = _true_distances(z, codebook, metric)  # (n, K)
    tol = _centred_tolerance(z, codebook, metric)
    best = true.sort(dim=1).values[:, :k]
    chosen = true.gather(1, indices)
    slack = tol.gather(1, indices) + tol.max(dim=1, keepdim=True).values
    assert bool((chosen <= best + slack).all()), f"not the nearest within tolerance: {((chosen - best) / slack).max()}"
    assert all(len(set(row)) == k for row in indices.tolist())
    scale = best[:, -1:].abs() + slack.max()
    floor = 4 * 2.0 ** -53 if metric == "cosine" else 0.0  # 1 - cos, measured in float64, is exact to an ulp of 1
    assert bool(((distances.double() - chosen).abs() <= 1e-5 * scale + 1e-6 * chosen.abs() + floor).all())


@pytest.mark.parametrize("offset_ratio", [0.0, 1e2, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("D", [3, 64, 512])
def test_soft_assign_forward_and_backward_are_exact_relative_to_the_spread(offset_ratio, dtype, D):
    """softmax(-|z - c|^2 / t) @ C and its gradients against float64 autograd: the forward within 1e-4 spread plus
    one ulp of the output, the gradients within 1e-3 of their own scale (which the spread sets)."""
    z, codebook, spread = _offset_data(30, 50, D, offset_ratio, dtype, seed=D)
    t = spread ** 2 * D / 4  # a soft assignment over a few codes
    z64, c64 = z.double().requires_grad_(), codebook.double().requires_grad_()
    want = torch.softmax(-(z64[:, None] - c64[None]).square().sum(-1) / t, dim=1) @ c64
    zq, cq = z.clone().requires_grad_(), codebook.clone().requires_grad_()
    out = ops.soft_assign(zq, cq, temperature=t)
    ulp = torch.finfo(dtype).eps * want.detach().abs().max()
    assert float((out.double() - want).abs().max()) <= 1e-4 * spread + ulp
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_want = torch.autograd.grad(want, (z64, c64), grad)
    g_got = torch.autograd.grad(out, (zq, cq), grad.to(dtype))
    for got, exp in zip(g_got, g_want):
        scale = float(exp.abs().max())
        assert float((got.double() - exp).abs().max()) <= 1e-3 * scale + 1e-12


# ----------------------------------------------------------------------------------------------------------------
# soft_assign


@given(n=st.integers(0, 40), K=st.integers(1, 300), D=st.sampled_from([1, 4, 9, 16, 33]),
       metric=st.sampled_from(["l2", "dot"]), dtype=st.sampled_from(DTYPES), layout=st.integers(0, 2),
       temperature=st.floats(0.05, 5.0), seed=st.integers(0, 2 ** 16))
def test_soft_assign_matches_reference(n, K, D, metric, dtype, layout, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    z = _maybe_strided(torch.randn(n, D, generator=gen).to(dtype), layout)
    codebook = _maybe_strided(torch.randn(K, D, generator=gen).to(dtype), (layout + 2) % 3)
    t = torch.tensor(temperature, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    code = ops.METRICS[metric]
    out, lse = torch.ops.quantkit.soft_assign(z, codebook, t, code)
    ref_out, ref_lse = ops.soft_assign_reference(z, codebook, t, code)
    assert out.dtype == dtype and out.shape == (n, D) and lse.shape == (n,)
    rtol = {torch.float64: 1e-10, torch.float32: 2e-4}.get(dtype, 2e-2)
    torch.testing.assert_close(out.double(), ref_out.double(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=rtol, atol=rtol)
    grad = torch.randn(n, D, generator=gen).to(dtype)
    got = torch.ops.quantkit.soft_assign_backward(grad, z, codebook, t, out, lse, code)
    want = ops.soft_assign_backward_reference(grad, z, codebook, t, out, lse, code)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = (w.double().abs().max().item() if w.numel() else 0.0) + 1.0
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol * 10, atol=rtol * 10 * scale)


@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
def test_soft_assign_gradcheck_float64(metric):
    z = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.soft_assign(a, b, c, metric=metric), (z, codebook, t))


@pytest.mark.parametrize("metric", METRICS)
def test_nearest_distances_gradcheck_float64(metric):
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.nearest_codeword(a, b, metric=metric, k=2).distances,
                                    (z, codebook))


@needs_kernel
def test_soft_assign_backward_is_deterministic_across_thread_counts():
    z, codebook, grad = torch.randn(300, 12), torch.randn(700, 12), torch.randn(300, 12)
    t = torch.tensor(0.3)
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, lse = torch.ops.quantkit.soft_assign(z, codebook, t, 0)
            grads.append(torch.ops.quantkit.soft_assign_backward(grad, z, codebook, t, out, lse, 0))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# torch.library integration


def test_opcheck_all_ops():
    z, codebook = torch.randn(20, 6), torch.randn(13, 6)
    for dtype in (torch.float32, torch.float64):
        zz, cc = z.to(dtype).requires_grad_(), codebook.to(dtype).requires_grad_()
        for metric in range(3):
            op = torch.ops.quantkit.nearest_codeword.default
            torch.library.opcheck(op, (zz.detach(), cc.detach(), metric, 3))
            # With grad-requiring inputs opcheck's aot_dispatch test sums all outputs into one tensor, which
            # fails on the int64 indices output; the autograd registration itself is still checked here.
            torch.library.opcheck(op, (zz, cc, metric, 3),
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        t = torch.tensor(0.7, dtype=dtype, requires_grad=True)
        for metric in (0, 2):
            torch.library.opcheck(torch.ops.quantkit.soft_assign.default, (zz, cc, t, metric))
            out, lse = torch.ops.quantkit.soft_assign(zz.detach(), cc.detach(), t.detach(), metric)
            args = (torch.randn_like(out), zz.detach(), cc.detach(), t.detach(), out, lse, metric)
            torch.library.opcheck(torch.ops.quantkit.soft_assign_backward.default, args)


def test_compile_fullgraph_matches_eager():
    def f(z, codebook):
        near = ops.nearest_codeword(z, codebook, metric="l2", k=2)
        soft = ops.soft_assign(z, codebook, 0.5, metric="dot")
        return near.indices, near.distances, soft

    z, codebook = torch.randn(33, 8), torch.randn(50, 8)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(z, codebook), f(z, codebook)):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------------------------
# bad input: every case raises and names the argument


def _bad_calls():
    z, codebook = torch.randn(4, 3), torch.randn(5, 3)
    nan_z, inf_c = z.clone(), codebook.clone()
    nan_z[1, 2], inf_c[3, 0] = float("nan"), float("inf")
    near, soft = ops.nearest_codeword, ops.soft_assign
    return [
        ("z 1-D", lambda: near(z[0], codebook), "z"),
        ("z 3-D", lambda: near(z[None], codebook), "z"),
        ("codebook 1-D", lambda: near(z, codebook[0]), "codebook"),
        ("mismatched D", lambda: near(z, torch.randn(5, 4)), "codebook"),
        ("integer z", lambda: near(z.long(), codebook), "z"),
        ("integer codebook", lambda: near(z, codebook.int()), "codebook"),
        ("k > K", lambda: near(z, codebook, k=6), "k"),
        ("k = 0", lambda: near(z, codebook, k=0), "k"),
        ("unknown metric", lambda: near(z, codebook, metric="l1"), "metric"),
        ("other device", lambda: near(z, codebook.to("meta")), "device"),
        ("NaN in z", lambda: near(nan_z, codebook), "z"),
        ("inf in codebook", lambda: near(z, inf_c), "codebook"),
        ("soft: mismatched D", lambda: soft(z, torch.randn(5, 2)), "codebook"),
        ("soft: integer z", lambda: soft(z.int(), codebook), "z"),
        ("soft: zero temperature", lambda: soft(z, codebook, 0.0), "temperature"),
        ("soft: negative temperature tensor", lambda: soft(z, codebook, torch.tensor(-1.0)), "temperature"),
        ("soft: NaN in z", lambda: soft(nan_z, codebook), "z"),
        ("soft: inf in codebook", lambda: soft(z, inf_c), "codebook"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda case: case[0])
def test_bad_input_raises_and_names_the_argument(case):
    _, call, name = case
    with pytest.raises((ValueError, RuntimeError), match=name):
        call()


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda case: case[0])
def test_where_kernel_errors_crash_no_bad_call_reaches_a_kernel(case, monkeypatch):
    """torch 2.11 kills the process on an error thrown inside a kernel: there the wrappers must catch it all first."""
    monkeypatch.setattr(ops, "_KERNEL_ERRORS_RAISE", False)
    _, call, name = case
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.skipif(not HAS_NEAREST, reason="compiled CPU kernel not loaded")
@pytest.mark.skipif(not ops._KERNEL_ERRORS_RAISE, reason="this torch crashes on errors thrown inside kernels")
def test_kernels_reject_bad_input_themselves():
    z, codebook, t = torch.randn(4, 3), torch.randn(5, 3), torch.tensor(1.0)
    nan_z, inf_c = z.clone(), codebook.clone()
    nan_z[0, 0], inf_c[4, 2] = float("nan"), float("-inf")
    cases = [
        (lambda: torch.ops.quantkit.nearest_codeword(nan_z, codebook, 0, 1), "z contains NaN"),
        (lambda: torch.ops.quantkit.nearest_codeword(z, inf_c, 0, 1), "codebook contains NaN"),
        (lambda: torch.ops.quantkit.nearest_codeword(z[:0], inf_c, 0, 1), "codebook contains NaN"),
        (lambda: torch.ops.quantkit.nearest_codeword(z, codebook, 0, 6), "k must be"),
        (lambda: torch.ops.quantkit.nearest_codeword(z, codebook.double(), 0, 1), "same dtype"),
        (lambda: torch.ops.quantkit.nearest_codeword(z, codebook, 7, 1), "metric"),
        (lambda: torch.ops.quantkit.soft_assign(nan_z, codebook, t, 0), "z contains NaN"),
        (lambda: torch.ops.quantkit.soft_assign(z, inf_c, t, 0), "codebook contains NaN"),
        (lambda: torch.ops.quantkit.soft_assign(z, codebook, torch.tensor(0.0), 0), "temperature"),
        (lambda: torch.ops.quantkit.soft_assign(z, torch.randn(5, 2), t, 0), "codebook must have D=3"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


# ----------------------------------------------------------------------------------------------------------------
# the centred frame inside the kernel, and the instruction-set switch


@pytest.mark.skipif(not HAS_NEAREST, reason="compiled CPU kernel not loaded")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_kernel_frame_equals_the_reference_frame(metric, dtype):
    """The kernel (which finds the centre and moves rows and codes into the frame while packing) and the reference
    (which builds the moved copies) rank alike: same indices wherever the float64 gap is above rounding."""
    gen = torch.Generator().manual_seed(5)
    z = (100 + torch.randn(400, 24, generator=gen, dtype=torch.float64)).to(dtype)
    codebook = (100 + torch.randn(333, 24, generator=gen, dtype=torch.float64)).to(dtype)
    code = ops.METRICS[metric]
    got = torch.ops.quantkit.nearest_codeword(z, codebook, code, 3, True)
    want = ops.nearest_codeword_reference(z, codebook, code, 3, True)
    true = _true_distances(z, codebook, metric).sort(dim=1).values
    clear = (true[:, 1] - true[:, 0]) > 1e-4 * true[:, :2].abs().max(dim=1).values + 1e-9  # no near-tie at the top
    assert bool(clear.float().mean() > 0.9)
    assert torch.equal(got[0][clear, 0], want[0][clear, 0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_NEAREST, reason="compiled CPU kernel not loaded")
def test_frame_costs_no_copy_of_the_codebook():
    """The centred frame is built inside the kernel's packing: a 256 MiB codebook costs far less than its own size
    in extra memory (a Python-side frame would copy it, and z, on every call)."""
    import os

    def status_kib(field):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to read the peak resident size")
    codebook = 10 + torch.randn(1 << 20, 64)  # 256 MiB
    z = 10 + torch.randn(64, 64)
    ops.nearest_codeword(z, codebook)  # warm: thread pool, scratch, allocator
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident size
    before = status_kib("VmRSS")
    indices = ops.nearest_codeword(z, codebook).indices
    extra_mib = (status_kib("VmHWM") - before) / 1024
    assert extra_mib < 64, f"nearest_codeword used {extra_mib:.0f} MiB beyond its inputs"
    want = ops.nearest_codeword_reference(z[:8], codebook, 0, 1, True)[0][:, 0]
    assert torch.equal(indices[:8], want)


@pytest.mark.skipif(not HAS_NEAREST, reason="compiled CPU kernel not loaded")
def test_cpu_isa_is_reported_capped_and_an_unknown_value_is_named(monkeypatch):
    best = _ext.cpu_isa()
    assert best in ("avx512", "avx2", "scalar")
    monkeypatch.setenv("QUANTKIT_CPU_ISA", "scalar")
    assert _ext.cpu_isa() == "scalar"
    monkeypatch.setenv("QUANTKIT_CPU_ISA", "avx2")
    assert _ext.cpu_isa() == ("scalar" if best == "scalar" else "avx2")
    monkeypatch.setenv("QUANTKIT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="QUANTKIT_CPU_ISA must be avx512, avx2 or scalar.*sse9"):
        _ext.cpu_isa()
    with pytest.raises(RuntimeError, match="nearest_codeword: QUANTKIT_CPU_ISA must be"):
        ops.nearest_codeword(torch.randn(3, 4), torch.randn(5, 4))


@pytest.mark.skipif(not HAS_NEAREST, reason="compiled CPU kernel not loaded")
@pytest.mark.parametrize("isa", ["default", "avx2", "scalar"])
def test_few_rows_path_is_exact_for_every_width_and_metric(isa, monkeypatch):
    """N <= 16 streams the codes instead of packing them; rows shorter than one vector run in narrower vectors.
    Every row width around the vector sizes (1-33 floats), every metric, k = 1 and 3, on a codebook with duplicates
    (ties go to the lowest index) and a common offset."""
    if isa != "default":
        monkeypatch.setenv("QUANTKIT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(11)
    for D in (1, 4, 7, 8, 12, 16, 33):
        base = 50 + torch.randn(300, D, generator=gen)
        codebook = base[torch.arange(700) % 300]  # duplicates: ties everywhere
        for n in (1, 5, 16):
            z = 50 + torch.randn(n, D, generator=gen)
            for metric in METRICS:
                for k in (1, 3):
                    indices, distances = _nearest(z, codebook, metric, k)
                    _assert_optimal(z, codebook, metric, k, indices, distances)
                    assert bool((indices[:, 0] < 300).all()), f"D={D} n={n} {metric}: a later duplicate won a tie"

"""VectorQuantizer and its codebook machinery (quantkit/quantizers/vq.py, codebook.py): each test states one
invariant of the issue; the hand-computed examples spell the formulas out with plain numbers."""
import copy
import io

import faiss
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import VectorQuantizer, create_quantizer
from quantkit.quantizers import CodebookStep, DeadCodeConfig, EMAConfig, KMeansInit, Sampling
from quantkit.testing import check_quantizer

CONFIGS = [
    dict(),
    dict(metric="cosine", heads=2),
    dict(codebook_dim=3, ema=None, gradient="rotation", dead_code=DeadCodeConfig()),
    dict(heads=2, codebook_dim=5, kmeans_init=KMeansInit(min_vectors=16), dead_code=DeadCodeConfig(0.5)),
    dict(sampling=Sampling(temperature=0.5, topk=4)),
    dict(ema=None, gradient="diveq", dead_code=DeadCodeConfig()),
    dict(ema=EMAConfig(decay=1.0), dead_code=DeadCodeConfig(0.5)),
]


def _vq(**kw):
    return VectorQuantizer(8, 16, **kw)


def _buffers(q):
    return {k: v.clone() for k, v in q.state_dict().items()}


def _same_buffers(a, b, rtol=0.0, atol=0.0):
    return a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), rtol=rtol, atol=atol)
                                        for k in a)


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(kw) or "default")
def test_check_quantizer_contract(kw):
    check_quantizer(_vq(**kw), make=lambda: _vq(**kw))


# ---------------------------------------------------------------------------------------------------------------
# search


@settings(max_examples=30)
@given(n=st.integers(1, 40), k=st.integers(1, 50), heads=st.sampled_from([1, 2]),
       metric=st.sampled_from(["l2", "cosine"]), project=st.booleans(), seed=st.integers(0, 2**16))
def test_indices_are_the_float64_nearest_codeword(n, k, heads, metric, project, seed):
    torch.manual_seed(seed)
    q = VectorQuantizer(8, k, heads=heads, metric=metric, codebook_dim=3 if project else None).eval()
    x = torch.randn(n, 8) * 3
    idx = q(x).indices.reshape(-1)  # (n * heads,)
    h = q._to_codes_space(x).detach().double()  # (n * heads, C)
    c = q.codebook.weight.detach().double()
    if metric == "cosine":
        d = 1 - torch.nn.functional.normalize(h, dim=-1) @ torch.nn.functional.normalize(c, dim=-1).T
    else:
        d = torch.cdist(h, c).square()
    chosen = d.gather(1, idx[:, None])[:, 0]
    bound = 8 * 2**-24 * (h.square().sum(-1) + c.square().sum(-1).max()) + 1e-12
    assert bool((chosen <= d.min(1).values + bound).all())


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(kw) or "default")
def test_eval_decode_of_indices_equals_quantized(kw):
    q = _vq(**kw)
    q(torch.randn(64, 8))  # one training step (k-means, EMA, revival) before eval
    q.eval()
    out = q(torch.randn(5, 7, 8))
    assert torch.equal(q.decode(out.indices), out.quantized)


# ---------------------------------------------------------------------------------------------------------------
# gradients


def test_straight_through_gradient_is_identity():
    q = _vq()
    x = torch.randn(30, 8, requires_grad=True)
    g = torch.randn(30, 8)
    (q(x).quantized * g).sum().backward()
    assert torch.equal(x.grad, g)


def test_rotation_trick_gradient_matches_the_formula():
    """arXiv:2410.06424: q~ = lambda R z with R = I - 2 w w^T + 2 q^ u^T, u = z/|z|, q^ = q/|q|,
    w = (u + q^)/|u + q^|, lambda = |q|/|z|; the gradient is lambda R^T g. Built here as explicit D x D matrices."""
    q = _vq(gradient="rotation").double()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 8, dtype=torch.float64)
    codebook = q.codebook.weight.clone()  # before the step's EMA update
    out = q(x)
    (out.quantized * g).sum().backward()
    codes = codebook[out.indices]
    torch.testing.assert_close(out.quantized.detach(), codes)
    for z, c, gz, grad in zip(x.detach(), codes, g, x.grad):
        u, qh = z / z.norm(), c / c.norm()
        w = (u + qh) / (u + qh).norm()
        rot = torch.eye(8, dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(qh, u)
        lam = c.norm() / z.norm()
        torch.testing.assert_close(lam * rot @ z, c)  # the map really takes z to its code
        torch.testing.assert_close(grad, lam * rot.T @ gz)


def test_gradient_codebook_gets_gradient_and_ema_codebook_does_not():
    grad_q, ema_q = _vq(ema=None), _vq()
    for q in (grad_q, ema_q):
        q(torch.randn(20, 8, requires_grad=True)).loss.backward()
    assert grad_q.codebook.weight.grad is not None and grad_q.codebook.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in ema_q.parameters())


# ---------------------------------------------------------------------------------------------------------------
# codebook training, hand-computed


def test_ema_update_matches_hand_computed_example():
    q = VectorQuantizer(2, 3, ema=EMAConfig(decay=0.5, eps=0.1))
    cb = q.codebook
    cb.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    cb.embed_sum.copy_(cb.weight)
    cb.usage.fill_(1.0)
    x = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [9.0, 1.0]])  # codes 0, 0, 1; code 2 unused
    out = q(x)
    assert out.indices.tolist() == [0, 0, 1]
    # usage n = 0.5 * 1 + 0.5 * count = [1.5, 1.0, 0.5]; sums m = 0.5 * e + 0.5 * s
    assert cb.usage.tolist() == [1.5, 1.0, 0.5]
    m = [[0.0, 1.0], [9.5, 0.5], [0.0, 5.0]]
    torch.testing.assert_close(cb.embed_sum, torch.tensor(m))
    n, eps, k = 3.0, 0.1, 3  # smoothed n~ = (n_k + eps) / (n + K eps) * n
    smoothed = [(u + eps) / (n + k * eps) * n for u in (1.5, 1.0, 0.5)]
    expected = torch.tensor([[a / s for a in row] for row, s in zip(m, smoothed)])
    torch.testing.assert_close(cb.weight, expected)
    # loss: commitment 0.25 * mean squared error to the (old) codes
    torch.testing.assert_close(out.loss, torch.tensor(0.25 * (2 + 2 + 2) / 6))


def test_dead_code_revival_matches_hand_computed_example():
    q = VectorQuantizer(2, 4, ema=EMAConfig(decay=0.5, eps=1e-5), dead_code=DeadCodeConfig(threshold=0.8))
    cb = q.codebook
    cb.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]]))
    cb.embed_sum.copy_(cb.weight)
    cb.usage.copy_(torch.tensor([1.0, 1.0, 1.0, 1.2]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 0.0], [11.0, 0.0]])  # codes 0, 0, 1, 1
    q(x)
    # usage = 0.5 * old + 0.5 * count = [1.5, 1.5, 0.5, 0.6]: codes 2 and 3 are dead (< 0.8)
    revived = cb.weight[2:]
    assert not torch.equal(revived[0], revived[1])  # distinct batch rows
    for row in revived:
        assert any(torch.equal(row, r) for r in x)  # each a (recent) encoder output
    torch.testing.assert_close(cb.usage, torch.tensor([1.5, 1.5, 0.8, 0.8]))  # reset to the threshold
    torch.testing.assert_close(cb.embed_sum[2:], revived * 0.8)
    n = 1.5 + 1.5 + 0.5 + 0.6  # live codes: the EMA formula, computed before revival
    smoothed = (1.5 + 1e-5) / (n + 4e-5) * n
    torch.testing.assert_close(cb.weight[:2], torch.tensor([[0.5 / smoothed, 0.5 / smoothed],
                                                            [15.0 / smoothed, 0.0]]))


def test_dead_code_revival_never_uses_masked_rows_and_never_duplicates():
    q = VectorQuantizer(4, 32, dead_code=DeadCodeConfig(threshold=5.0))
    x = torch.randn(10, 4)
    mask = torch.arange(10) < 6
    q(x, mask=mask)
    new = q.codebook.weight
    from_batch = [i for i in range(32) if any(torch.equal(new[i], r) for r in x)]
    assert len(from_batch) == 6  # 32 dead codes, only 6 masked-in rows: 6 revived, each row once
    assert all(not torch.equal(new[i], r) for i in range(32) for r in x[~mask])


def _faiss_centroids(x, k, niter, seed):
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=256, min_points_per_centroid=1,
                      verbose=False)
    km.train(x.numpy())
    return torch.from_numpy(km.centroids)


def test_kmeans_init_is_deferred_until_enough_vectors_then_reproduces_faiss():
    # gradient-trained codebook: nothing else touches the weight in the step that runs k-means
    q = VectorQuantizer(4, 8, ema=None, kmeans_init=KMeansInit(min_vectors=40, niter=7, seed=3))
    batches = [torch.randn(15, 4) for _ in range(3)]
    initial = q.codebook.weight.detach().clone()
    for b in batches[:2]:  # 15, then 30 vectors seen: not enough
        q(b)
        assert not bool(q.codebook.initialized) and torch.equal(q.codebook.weight, initial)
    out = q(batches[2])  # 45 >= 40: k-means on the first 40, and this batch already uses the centroids
    assert bool(q.codebook.initialized)
    expected = _faiss_centroids(torch.cat(batches)[:40], 8, niter=7, seed=3)
    torch.testing.assert_close(q.codebook.weight.detach(), expected)
    assert torch.equal(out.indices, torch.cdist(batches[2], expected).argmin(1))


def test_kmeans_init_with_ema_sets_consistent_statistics():
    q = VectorQuantizer(4, 8, kmeans_init=KMeansInit(min_vectors=30, niter=5, seed=11))
    x = torch.randn(30, 4)
    centroids = _faiss_centroids(x, 8, niter=5, seed=11)
    q.codebook.prepare(x)  # the k-means half of a training step
    torch.testing.assert_close(q.codebook.weight, centroids)
    counts = torch.bincount(torch.cdist(x, centroids).argmin(1), minlength=8).float()
    torch.testing.assert_close(q.codebook.usage, counts)  # pool == one batch: counts need no rescaling
    torch.testing.assert_close(q.codebook.embed_sum, centroids * counts[:, None])


# ---------------------------------------------------------------------------------------------------------------
# state, precision, masks, purity, compile


def test_state_dict_round_trip_reproduces_indices_and_initialized_flag():
    kw = dict(kmeans_init=KMeansInit(min_vectors=16), dead_code=DeadCodeConfig(0.5), heads=2)
    q = _vq(**kw)
    q(torch.randn(32, 8))
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    fresh = _vq(**kw)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert bool(fresh.codebook.initialized)
    x = torch.randn(50, 8)
    assert torch.equal(fresh.eval()(x).indices, q.eval()(x).indices)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_low_precision_inputs_give_float32_indices_outside_near_ties(seed, dtype):
    torch.manual_seed(seed)
    q = VectorQuantizer(8, 32).eval()
    x = torch.randn(64, 8).to(dtype)
    ref = x.float()
    d = torch.cdist(ref.double(), q.codebook.weight.double()).square()
    two = d.topk(2, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-4 * two[:, 1].clamp_min(1)  # not a near-tie
    assert torch.equal(q(x).indices[clear], q(ref).indices[clear])
    assert q(x).quantized.dtype == dtype


@pytest.mark.parametrize("kw", CONFIGS[:4], ids=lambda kw: ",".join(kw) or "default")
def test_masked_rows_change_nothing(kw):
    x = torch.randn(40, 8)
    mask = torch.rand(40) > 0.3
    full, part = _vq(**kw), _vq(**kw)
    part.load_state_dict(full.state_dict())
    torch.manual_seed(1)
    a = full(x, mask=mask)
    torch.manual_seed(1)
    b = part(x[mask])
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.equal(a.indices[mask], b.indices)
    assert _same_buffers(_buffers(full), _buffers(part), rtol=1e-5, atol=1e-6)


def test_eval_changes_no_buffer_even_with_kmeans_pending():
    q = _vq(kmeans_init=KMeansInit(min_vectors=16), dead_code=DeadCodeConfig()).eval()
    before = _buffers(q)
    q(torch.randn(64, 8))
    q.encode(torch.randn(64, 8))
    assert _same_buffers(before, _buffers(q)) and q.codebook._pool == []


def test_compiled_eval_forward_matches_eager():
    q = _vq(heads=2, metric="cosine").eval()
    x = torch.randn(4, 6, 8)
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    got, expected = compiled(x), q(x)
    assert torch.equal(got.indices, expected.indices)
    torch.testing.assert_close(got.quantized, expected.quantized)
    torch.testing.assert_close(got.loss, expected.loss)


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("make, argument", [
    (lambda: VectorQuantizer(8, 0), "codebook_size"),
    (lambda: VectorQuantizer(8, 16, heads=3), "heads"),
    (lambda: VectorQuantizer(8, 16, metric="dot"), "metric"),
    (lambda: VectorQuantizer(8, 16, gradient="gumbel"), "gradient"),
    (lambda: VectorQuantizer(8, 16, commitment_weight=-1.0), "commitment_weight"),
    (lambda: EMAConfig(decay=1.5), "decay"),
    (lambda: VectorQuantizer(8, 16, diveq_variance=-1.0), "diveq_variance"),
    (lambda: CodebookStep(accumulate=1), "accumulate"),
    (lambda: EMAConfig(decay=0.0), "decay"),
    (lambda: EMAConfig(eps=0.0), "eps"),
    (lambda: DeadCodeConfig(threshold=0), "threshold"),
    (lambda: KMeansInit(niter=0), "niter"),
    (lambda: VectorQuantizer(8, 16, kmeans_init=KMeansInit(min_vectors=4)), "min_vectors"),
    (lambda: Sampling(temperature=0.0), "temperature"),
])
def test_bad_config_raises_naming_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


@pytest.mark.parametrize("x, argument", [
    (torch.randn(4, 7), "x"),
    (torch.full((4, 8), float("nan")), "NaN"),
    (torch.randint(0, 3, (4, 8)), "x"),
])
def test_bad_input_raises_and_leaves_buffers_unchanged(x, argument):
    q = _vq(kmeans_init=KMeansInit(min_vectors=16), dead_code=DeadCodeConfig())
    before = _buffers(q)
    with pytest.raises(ValueError, match=argument):
        q(x)
    with pytest.raises(ValueError, match="mask"):
        q(torch.randn(4, 8), mask=torch.ones(5, dtype=torch.bool))
    assert _same_buffers(before, _buffers(q)) and q.codebook._pool == []


def test_registry_builds_vq():
    assert isinstance(create_quantizer("vq", dim=4, codebook_size=3), VectorQuantizer)
    assert np.prod(create_quantizer("vq", dim=4, codebook_size=3, heads=2)(torch.randn(5, 4)).indices.shape) == 10


# ---------------------------------------------------------------------------------------------------------------
# per-step codebook control (CodebookStep), decay = 1, top-k, DiVeQ


def _seeded_ema_vq(decay=0.5):
    torch.manual_seed(0)
    return VectorQuantizer(4, 6, ema=EMAConfig(decay=decay, eps=0.1)).train()


def test_code_weight_scales_each_codes_ema_rate_float64_reference():
    q, x = _seeded_ema_vq(), torch.randn(50, 4)
    cb = q.codebook
    usage, sums = cb.usage.double().clone(), cb.embed_sum.double().clone()
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 1.0, 0.25])
    with cb.stepping(CodebookStep(weight=w)):
        idx = q(x).indices
    counts = torch.zeros(6, dtype=torch.float64).index_add_(0, idx, torch.ones(50, dtype=torch.float64))
    s = torch.zeros(6, 4, dtype=torch.float64).index_add_(0, idx, x.double())
    rate = 0.5 * w.double()  # (1 - decay) * w_k
    usage = usage + rate * (counts - usage)
    sums = sums + rate[:, None] * (s - sums)
    n = usage.sum()
    expected = sums / ((usage + 0.1) / (n + 6 * 0.1) * n)[:, None]
    torch.testing.assert_close(cb.weight.double(), expected, rtol=1e-5, atol=1e-6)
    assert cb.step_rule == CodebookStep()  # restored after the block


def test_callable_code_weight_gets_this_steps_statistics():
    q, x = _seeded_ema_vq(), torch.randn(30, 4)
    seen = []

    def weight(sums, counts):
        seen.append((sums.clone(), counts.clone()))
        return torch.ones_like(counts)

    reference = copy.deepcopy(q)
    with q.codebook.stepping(CodebookStep(weight=weight)):
        idx = q(x).indices
    reference(x)
    assert torch.equal(seen[0][1], torch.bincount(idx, minlength=6).float())
    torch.testing.assert_close(seen[0][0], torch.zeros(6, 4).index_add_(0, idx, x))
    assert torch.equal(q.codebook.weight, reference.codebook.weight)  # weight 1 everywhere: an ordinary step


def test_accumulated_steps_apply_once_as_the_sum_of_their_statistics():
    q = _seeded_ema_vq()
    reference = copy.deepcopy(q)
    a, b = torch.randn(20, 4), torch.randn(30, 4)
    before = q.codebook.weight.clone()
    with q.codebook.stepping(CodebookStep(accumulate=True)):
        ia = q(a).indices
    assert torch.equal(q.codebook.weight, before)  # nothing applied yet
    ib = q(b).indices  # applies a's and b's statistics at once
    cb = reference.codebook
    assert torch.equal(ia, cb.search(a).indices) and torch.equal(ib, cb.search(b).indices)
    cb.update(torch.cat([a, b]), torch.cat([ia, ib]))  # one step over both batches
    torch.testing.assert_close(q.codebook.weight, cb.weight)
    torch.testing.assert_close(q.codebook.usage, cb.usage)


@pytest.mark.parametrize("step", [dict(frozen=True), dict(decay=1.0)], ids=["frozen", "decay_one"])
def test_frozen_step_and_decay_one_leave_the_codebook_exactly_unchanged(step):
    q = _seeded_ema_vq(step.get("decay", 0.5))
    before = _buffers(q)
    rule = CodebookStep(frozen=step.get("frozen", False))
    with q.codebook.stepping(rule):
        for _ in range(3):
            q(torch.randn(20, 4))
    after = _buffers(q)
    for name in ("codebook.weight", "codebook.embed_sum", "codebook.usage"):
        assert torch.equal(before[name], after[name]), name


def test_bad_code_weight_is_refused_before_any_change():
    q = _seeded_ema_vq()
    before = _buffers(q)
    for bad, match in [(torch.ones(5), "shape"), (torch.full((6,), float("nan")), "finite"),
                       (-torch.ones(6), ">= 0")]:
        with pytest.raises(ValueError, match=match):
            with q.codebook.stepping(CodebookStep(weight=bad)):
                q(torch.randn(10, 4))
    with pytest.raises(ValueError, match="shape"), q.codebook.stepping(CodebookStep(weight=lambda s, c: c[:2])):
        q(torch.randn(10, 4))
    assert _same_buffers(before, _buffers(q))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 30), k=st.integers(1, 20), metric=st.sampled_from(["l2", "cosine"]),
       seed=st.integers(0, 2**16))
def test_nearest_returns_the_float64_k_nearest_in_order_and_changes_nothing(n, k, metric, seed):
    torch.manual_seed(seed)
    q = VectorQuantizer(6, 12, metric=metric).train()
    x = torch.randn(n, 6)
    before = _buffers(q)
    codes, idx, err = q.nearest(x, k)
    k = min(k, 12)
    assert codes.shape == (n, k, 6) and idx.shape == (n, k) and err.shape == (n, k)
    assert _same_buffers(before, _buffers(q))
    zx = torch.nn.functional.normalize(x.double(), dim=-1) if metric == "cosine" else x.double()
    cb = q.codebook.lookup(torch.arange(12)).double()
    d = torch.cdist(zx, cb).square() / 6  # (n, K) mean squared error, float64
    ref = torch.sort(d, dim=1, stable=True).values[:, :k]
    torch.testing.assert_close(err.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(err.double(), d.gather(1, idx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codes, q.decode(idx))


def test_diveq_without_noise_returns_the_code_with_the_closed_form_gradients():
    q = VectorQuantizer(4, 5, ema=None, gradient="diveq", diveq_variance=0.0, commitment_weight=0.0,
                        codebook_weight=0.0).double().train()
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 4, dtype=torch.float64)
    out = q(x)
    codes = q.codebook.weight.detach()[out.indices]
    torch.testing.assert_close(out.quantized, codes)
    (out.quantized * g).sum().backward()
    u = torch.nn.functional.normalize(codes - x.detach(), dim=-1)  # the error direction
    along = (u * g).sum(-1, keepdim=True)  # (N, 1)
    torch.testing.assert_close(x.grad, g - u * along)  # z + |e - z| u: identity minus the u component
    expected = torch.zeros(5, 4, dtype=torch.float64).index_add_(0, out.indices, u * along)
    torch.testing.assert_close(q.codebook.weight.grad, expected)

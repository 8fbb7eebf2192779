"""VectorQuantize's per-call codebook options, top-k and DiVeQ (issue 17, part C) against the peer (a test
dependency), with the peer's weights copied by ``load_peer_state_dict``: same eval outputs and indices, and the same
codebook after N training steps wherever the peer is deterministic given the input."""
import pytest
import torch

import quantkit.compat.vector_quantize_pytorch as compat

peer = pytest.importorskip("vector_quantize_pytorch")

from test_compat_vqpytorch import _assert_same, _pair  # noqa: E402  (the side-by-side helpers)


def _train_both(options: dict, steps: int = 3, calls=None, dim: int = 8, size: int = 16, heads: int = 1):
    """Peer and adapter (peer weights) trained side by side for ``steps`` calls; ``calls(step)`` gives each call's
    forward keywords. Returns (peer, adapter)."""
    torch.manual_seed(0)
    p, a = _pair("VectorQuantize", dim=dim, codebook_size=size, heads=heads, **options)
    p.train(), a.train()
    for step in range(steps):
        x = torch.randn(2, 40, dim) + 0.3 * step
        kw = calls(step) if calls else {}
        p(x, **kw)
        a(x, **kw)
    return p, a


def _codebooks_close(p, a, atol=1e-5):
    theirs = p.codebook
    ours = a.codebook
    torch.testing.assert_close(ours, theirs.reshape(ours.shape), atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# decay = 1, freeze_codebook


def test_decay_one_never_moves_the_codebook_and_matches_peer():
    p, a = _train_both(dict(decay=1.0))
    _codebooks_close(p, a)
    torch.manual_seed(0)
    fresh = peer.VectorQuantize(dim=8, codebook_size=16, decay=1.0)
    torch.testing.assert_close(p.codebook, fresh.codebook, atol=1e-6, rtol=0)  # the peer: rounding only
    assert torch.equal(a.codebook, fresh.codebook)  # quantkit: exactly


@pytest.mark.parametrize("where", ["forward", "constructor"])
def test_freeze_codebook_keeps_codebook_and_matches_peer(where):
    options = dict(freeze_codebook=True) if where == "constructor" else {}
    calls = (lambda step: dict(freeze_codebook=True)) if where == "forward" else None
    p, a = _train_both(options, calls=calls)
    torch.manual_seed(0)
    fresh = peer.VectorQuantize(dim=8, codebook_size=16, **options)
    assert torch.equal(a.codebook, fresh.codebook.reshape(a.codebook.shape))
    _codebooks_close(p, a, atol=0)
    x = torch.randn(2, 40, 8)  # forward's False overrides the constructor's True: the codebook moves again
    a(x, freeze_codebook=False)
    assert not torch.equal(a.codebook, fresh.codebook.reshape(a.codebook.shape))


# ----------------------------------------------------------------------------------------------------------------
# ema_update_weight, accum_ema_update


def _code_weights(size: int, heads: int = 1) -> torch.Tensor:
    w = torch.linspace(0.0, 1.5, size).repeat(heads, 1)
    w[:, ::3] = 0.0  # codes that must not move
    return w


@pytest.mark.parametrize("case", ["tensor", pytest.param("tensor_2d", marks=pytest.mark.slow), "callable",
                                  "separate_heads"])
def test_ema_update_weight_matches_peer_after_training(case):
    heads = 2 if case == "separate_heads" else 1
    options = dict(separate_codebook_per_head=True, codebook_dim=4) if heads == 2 else {}
    weight = _code_weights(16, heads)
    if case == "tensor":
        weight = weight[0]

    def by_usage(embed_sum, cluster_size):  # (h, K, D), (h, K) -> (h, K): move only codes used this step
        return (cluster_size > 0).float()

    value = by_usage if case == "callable" else weight
    p, a = _train_both(options, heads=heads, calls=lambda step: dict(ema_update_weight=value))
    _codebooks_close(p, a)
    if case != "callable":  # weight 0: that code's EMA statistics did not move (its code moves only through the
        frozen = (weight.reshape(-1, 16) == 0)[0]  # smoothing's total count, in the peer as here)
        for q in a.quantizers:
            assert torch.equal(q.codebook.usage[frozen], torch.ones(int(frozen.sum())))


def test_ema_update_weight_of_the_wrong_shape_is_refused_before_any_change():
    vq = compat.VectorQuantize(dim=8, codebook_size=16).train()
    before = vq.codebook.clone()
    heads = compat.VectorQuantize(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True).train()
    bad_second_head = torch.ones(2, 16)
    bad_second_head[1, 0] = -1.0
    with pytest.raises(ValueError, match=">= 0"):
        heads(torch.randn(2, 10, 8), ema_update_weight=bad_second_head)
    assert all(q.codebook.step_rule.weight is None for q in heads.quantizers)  # the first head's rule was undone
    with pytest.raises(ValueError, match="ema_update_weight"):
        vq(torch.randn(2, 10, 8), ema_update_weight=torch.ones(15))
    with pytest.raises(ValueError, match=">= 0"):
        vq(torch.randn(2, 10, 8), ema_update_weight=-torch.ones(16))
    assert torch.equal(vq.codebook, before)


def test_accum_ema_update_matches_peer():
    def calls(step):  # two accumulating calls, then the one that applies everything; then once more
        return dict(accum_ema_update=step in (0, 1))

    p, a = _train_both({}, steps=4, calls=calls)
    _codebooks_close(p, a)
    p2, a2 = _train_both({}, steps=2, calls=lambda step: dict(accum_ema_update=True))
    torch.manual_seed(0)
    fresh = peer.VectorQuantize(dim=8, codebook_size=16)
    assert torch.equal(a2.codebook, fresh.codebook) and torch.equal(p2.codebook, fresh.codebook)  # nothing applied


# ----------------------------------------------------------------------------------------------------------------
# topk


@pytest.mark.parametrize("options", [dict(codebook_dim=4), dict(use_cosine_sim=True), dict(commitment_weight=0.0),
                                     dict(accept_image_fmap=True), dict(channel_last=False)],
                         ids=["projection", "cosine", "no_commitment", "image", "channel_first"])
def test_topk_matches_peer_in_eval(options):
    p, a = _pair("VectorQuantize", dim=8, codebook_size=32, **options)
    x = torch.randn(2, 8, 4, 5) if options.get("accept_image_fmap") else \
        torch.randn(2, 8, 30) if options.get("channel_last") is False else torch.randn(2, 30, 8)
    atol = 1e-6 if options.get("use_cosine_sim") else 1e-6
    _assert_same(p(x, topk=5), a(x, topk=5), atol=atol)


def test_topk_with_mask_and_in_training_matches_peer():
    p, a = _pair("VectorQuantize", dim=8, codebook_size=32)
    x, mask = torch.randn(2, 30, 8), torch.rand(2, 30) > 0.3
    _assert_same(p(x, topk=4, mask=mask), a(x, topk=4, mask=mask), atol=1e-6)
    p.train(), a.train()
    before = a.codebook.clone()
    xa, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_p, out_a = p(xp, topk=4, mask=mask), a(xa, topk=4, mask=mask)
    _assert_same([t.detach() for t in out_p], [t.detach() for t in out_a], atol=1e-6)
    assert torch.equal(a.codebook, before)  # top-k never updates the codebook, as in the peer
    (out_a[0].square().sum() + out_a[2].sum()).backward()
    (out_p[0].square().sum() + out_p[2].sum()).backward()
    torch.testing.assert_close(xa.grad, xp.grad, atol=1e-5, rtol=1e-5)  # rotation trick to every candidate


def test_topk_first_column_is_forward():
    vq = compat.VectorQuantize(dim=8, codebook_size=32).eval()
    x = torch.randn(3, 20, 8)
    out, idx, _ = vq(x)
    out_k, idx_k, loss_k = vq(x, topk=3)
    assert torch.equal(idx_k[..., 0], idx)
    torch.testing.assert_close(out_k[..., 0, :], out)
    assert bool((loss_k[..., 1:] >= loss_k[..., :-1]).all())  # nearest first
    with pytest.raises(ValueError, match="topk"):
        compat.VectorQuantize(dim=8, codebook_size=32, heads=2)(x, topk=2)


# ----------------------------------------------------------------------------------------------------------------
# directional_reparam (DiVeQ)


def test_directional_reparam_matches_peer_in_eval_and_trains_the_codebook():
    options = dict(directional_reparam=True, threshold_ema_dead_code=1)
    p, a = _pair("VectorQuantize", dim=8, codebook_size=16, **options)
    x = torch.randn(2, 30, 8)
    _assert_same(p(x), a(x))
    inner = a.quantizers[0]
    assert inner.gradient == "diveq" and inner.codebook.ema is None and isinstance(inner.codebook.weight,
                                                                                   torch.nn.Parameter)
    a.train()
    out, idx, loss = a(x)
    assert float(loss.detach()) == 0.0  # no commitment loss under DiVeQ, as in the peer
    out.square().sum().backward()
    assert inner.codebook.weight.grad is not None and inner.codebook.weight.grad.abs().sum() > 0
    codes = a.get_output_from_indices(idx)
    assert (out - codes).norm(dim=-1).max() < 0.5 * (x - codes).norm(dim=-1).mean()  # noise tilts the direction only


@pytest.mark.parametrize("options,match", [(dict(), "threshold_ema_dead_code"),
                                           (dict(threshold_ema_dead_code=1, rotation_trick=True), "rotation"),
                                           (dict(threshold_ema_dead_code=1, ema_update=True), "EMA")])
def test_directional_reparam_refuses_what_the_peer_asserts(options, match):
    with pytest.raises(ValueError, match=match):
        compat.VectorQuantize(dim=8, codebook_size=16, directional_reparam=True, **options)

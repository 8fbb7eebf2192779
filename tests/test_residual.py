"""ResidualQuantizer: each depth quantizes its own residual, decode takes any prefix of depths, quantize-dropout acts
only in training (seeded, -1 for skipped depths), and the Quantizer contract over FSQ, LFQ and (when registered) VQ."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from quantkit import ResidualQuantizer, create_quantizer, list_quantizers
from quantkit.testing import check_quantizer

INNERS = [dict(quantizer="fsq", levels=(5, 4, 3), layer_scale=0.25), dict(quantizer="lfq", codebook_size=8,
                                                                          layer_scale=0.5)]
if "vq" in list_quantizers():
    INNERS.append(dict(quantizer="vq", codebook_size=16))


@settings(max_examples=20)
@given(st.sampled_from(INNERS), st.integers(1, 4), st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_each_depth_quantizes_its_own_residual(inner, depth, shared, seed):
    q = ResidualQuantizer(3, depth=depth, shared_codebook=shared, **inner).eval()
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(seed))
    out = q(x)
    assert out.indices.shape == (40, depth)
    residual = x.clone()
    for d in range(depth):
        layer, s = q.layer(d), (inner.get("layer_scale") or 1.0) ** d
        idx = out.indices[:, d]
        if inner["quantizer"] == "vq" and not getattr(layer, "heads", 1) > 1:
            codes = layer.decode(torch.arange(layer.codebook_size))  # nearest code, float64 brute force
            dist = torch.cdist((residual / s).double(), codes.double())
            best = dist.min(-1).values
            assert torch.all(dist.gather(1, idx[:, None])[:, 0] <= best + 1e-5 * (1 + best))
        else:
            assert torch.equal(idx, layer.encode(residual / s))
        residual = residual - layer.decode(idx) * s
    torch.testing.assert_close(out.quantized, x - residual)


@given(st.sampled_from(INNERS), st.integers(1, 4), st.integers(0, 2 ** 31 - 1))
def test_partial_depth_decode_sums_the_first_levels(inner, depth, seed):
    q = ResidualQuantizer(3, depth=depth, **inner).eval()
    x = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(seed))
    out = q(x)
    assert torch.equal(q.decode(out.indices), out.quantized)  # eval round trip, exact
    partial = torch.zeros_like(x)
    for d in range(depth):
        s = (inner.get("layer_scale") or 1.0) ** d
        partial = partial + q.layer(d).decode(out.indices[..., d]) * s
        torch.testing.assert_close(q.decode(out.indices[..., :d + 1]), partial)
    with pytest.raises(ValueError, match="depth"):
        q.decode(out.indices[..., :0])


def test_quantize_dropout_only_in_training_and_seeded():
    make = lambda: ResidualQuantizer(4, quantizer="lfq", depth=4, codebook_size=16, quantize_dropout=1.0, seed=3)
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    x = torch.randn(200, 4)
    ta, tb = a(x), b(x)
    assert torch.equal(ta.indices, tb.indices)  # same seed, same dropout
    dropped = ta.indices == -1
    assert dropped.any() and (~dropped[:, 0]).all()  # min_depth = 1 keeps the first level
    assert torch.equal(dropped, dropped.cummax(dim=1).values)  # a prefix is kept
    assert torch.equal(a.decode(ta.indices), ta.quantized)  # -1 decodes to nothing, even in training
    assert ta.stats["usage"] > 0
    a.eval()
    assert (a(x).indices >= 0).all()
    c = ResidualQuantizer(4, quantizer="lfq", depth=4, codebook_size=16, quantize_dropout=0.5, min_depth=3)
    assert (c(x).indices[:, :3] >= 0).all()


def test_gradient_reaches_x_through_the_first_depth_only():
    q = ResidualQuantizer(5, quantizer="lfq", depth=3, codebook_size=32, commitment_weight=0.0)
    assert q.identity_gradient
    x = torch.randn(9, 5, requires_grad=True)
    g = torch.randn(9, 5)
    (grad,) = torch.autograd.grad(q(x).quantized, x, g)
    assert torch.equal(grad, g)


def test_partial_sum_commitment_and_summed_inner_losses():
    q = ResidualQuantizer(4, quantizer="lfq", depth=2, codebook_size=16, commitment_weight=0.5,
                          entropy=dict(weight=0.0)).eval()
    x = torch.randn(30, 4)
    out = q(x)
    codes0 = torch.where(x > 0, 1.0, -1.0)
    r1 = x - codes0
    codes1 = torch.where(r1 > 0, 1.0, -1.0)
    inner = 0.25 * ((x - codes0).square().mean() + (r1 - codes1).square().mean())
    partial = ((x - codes0).square().mean() + (x - codes0 - codes1).square().mean()) / 2
    torch.testing.assert_close(out.loss, inner + 0.5 * partial)


def test_shared_codebook_has_one_module_and_state_dict_round_trip():
    shared = ResidualQuantizer(6, quantizer="fsq", depth=3, levels=(4, 4), shared_codebook=True)
    assert len(shared.layers) == 1 and shared.layer(2) is shared.layer(0)
    other = ResidualQuantizer(6, quantizer="fsq", depth=3, levels=(4, 4), shared_codebook=True)
    other.load_state_dict(shared.state_dict())
    x = torch.randn(20, 6)
    assert torch.equal(shared.encode(x), other.encode(x))


@pytest.mark.parametrize("inner", INNERS)
def test_contract_via_check_quantizer(inner):
    check_quantizer(ResidualQuantizer(3, depth=3, quantize_dropout=0.5, seed=0, **inner))


def test_mask_equals_the_truncated_batch():
    q = ResidualQuantizer(4, quantizer="lfq", depth=3, codebook_size=16, commitment_weight=0.3)
    x = torch.randn(3, 11, 4)
    mask = torch.rand(3, 11) > 0.5
    a, b = q(x, mask=mask), q(x[mask])
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.equal(a.indices[mask], b.indices) and torch.equal(a.quantized[mask], b.quantized)


def test_bad_config_and_input_raise_and_leave_state_unchanged():
    for depth in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="depth"):
            ResidualQuantizer(4, quantizer="fsq", depth=depth, levels=(3, 3))
    with pytest.raises(ValueError, match="codebook_size"):
        ResidualQuantizer(4, quantizer="lfq", depth=2, codebook_size=12)
    with pytest.raises(ValueError, match="quantize_dropout"):
        ResidualQuantizer(4, quantizer="lfq", depth=2, codebook_size=16, quantize_dropout=1.5)
    with pytest.raises(ValueError, match="unknown quantizer"):
        ResidualQuantizer(4, quantizer="nope", depth=2)
    q = create_quantizer("residual", dim=4, quantizer="lfq", depth=2, codebook_size=16)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    for bad in (torch.randn(3, 5), torch.tensor([[float("nan")] * 4])):
        with pytest.raises(ValueError, match="x"):
            q(bad)
    with pytest.raises(ValueError, match="indices"):
        q.decode(torch.tensor([[0, 16]]))
    with pytest.raises(ValueError, match="depth"):
        q.decode(torch.zeros(2, 3, dtype=torch.int64))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())

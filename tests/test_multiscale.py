"""MultiScaleResidualQuantizer (VAR): each scale picks the nearest code to its downsampled residual, per-scale token
maps round-trip, partial scales decode, the generator helpers agree with decode, and the Quantizer contract."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from quantkit import MultiScaleResidualQuantizer, create_quantizer
from quantkit.quantizers import DeadCodeConfig
from quantkit.testing import check_quantizer, utilization_after_training

patch_st = st.sampled_from([(1, 2, 3), (1, 2, 3, 4), (1, 3, 5), (2, (3, 2), (4, 3))])


def _make(patch_nums, num_phi=4, seed=0, dim=4, size=16):
    torch.manual_seed(seed)
    return MultiScaleResidualQuantizer(dim, size, patch_nums=patch_nums, num_phi=num_phi).eval()


@settings(max_examples=12)
@given(patch_st, st.sampled_from([4, None, 0]), st.integers(0, 2 ** 31 - 1))
def test_each_scale_picks_the_nearest_code_to_its_downsampled_residual(patch_nums, num_phi, seed):
    q = _make(patch_nums, num_phi, seed)
    x = q.example_input(3, torch.Generator().manual_seed(seed))
    maps = q.encode_scales(x)
    assert [tuple(m.shape) for m in maps] == [(3, *s) for s in q.sizes]
    rest, codes = x.double(), q.codebook.detach().double()
    for k, idx in enumerate(maps):
        r = F.interpolate(rest, size=q.sizes[k], mode="area") if k < q.num_scales - 1 else rest
        rows = r.permute(0, 2, 3, 1).reshape(-1, q.dim)
        dist = torch.cdist(rows, codes).square()  # float64 brute force
        best = dist.min(-1).values
        chosen = dist.gather(1, idx.reshape(-1, 1))[:, 0]
        assert torch.all(chosen <= best + 1e-4 * (1 + best))
        with torch.no_grad():
            rest = rest - q._contribution(k, idx, torch.float64).double()


@settings(max_examples=10)
@given(patch_st, st.integers(0, 2 ** 31 - 1))
def test_eval_round_trip_scales_and_concatenated_indices(patch_nums, seed):
    q = _make(patch_nums, seed=seed)
    x = q.example_input(2, torch.Generator().manual_seed(seed))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    out = q(x)
    maps = q.encode_scales(x)
    assert out.indices.shape == (2, q.num_tokens)
    assert torch.equal(out.indices, torch.cat([m.flatten(1) for m in maps], 1))
    assert torch.equal(q.encode(x), out.indices)
    assert torch.equal(q.decode_scales(maps), out.quantized)
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert [torch.equal(a, b) for a, b in zip(q.split_scales(out.indices), maps)] == [True] * q.num_scales
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # eval purity


def test_partial_scales_and_generator_helpers_agree_with_decode():
    q = _make((1, 2, 3, 4))
    x = q.example_input(2, torch.Generator().manual_seed(1))
    maps = q.encode_scales(x)
    f_hat, inputs = None, []
    for k in range(q.num_scales):
        f_hat, nxt = q.next_scale_input(k, f_hat, maps[k])
        torch.testing.assert_close(f_hat, q.decode_scales(maps[:k + 1]))
        torch.testing.assert_close(f_hat, q.decode(torch.cat([m.flatten(1) for m in maps[:k + 1]], 1)))
        if nxt is not None:
            assert nxt.shape == (2, q.dim, *q.sizes[k + 1])
            inputs.append(nxt.flatten(2).transpose(1, 2))
    assert nxt is None
    tf = q.teacher_forcing_inputs(maps)
    assert tf.shape == (2, q.num_tokens - 1, q.dim)
    torch.testing.assert_close(tf, torch.cat(inputs, 1))
    assert torch.equal(q.token_scales(), torch.tensor([0] + [1] * 4 + [2] * 9 + [3] * 16))


def test_refinement_convs_are_partially_shared_as_in_var():
    q = MultiScaleResidualQuantizer(8, 32, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert len(q.phi) == 4
    assert q._phi_of_scale[0] == 0 and q._phi_of_scale[-1] == 3
    assert q._phi_of_scale == sorted(q._phi_of_scale) and set(q._phi_of_scale) == {0, 1, 2, 3}
    assert len(MultiScaleResidualQuantizer(8, 32, num_phi=None).phi) == 4
    assert len(MultiScaleResidualQuantizer(8, 32, phi_ratio=0.0).phi) == 0


def test_training_loss_and_gradients():
    q = _make((1, 2, 4)).train()
    x = q.example_input(3, torch.Generator().manual_seed(2)).requires_grad_(True)
    out = q(x)
    f_hats, f_hat = [], None
    for k, m in enumerate(q.encode_scales(x.detach())):
        f_hat, _ = q.next_scale_input(k, f_hat, m)
        f_hats.append(f_hat)
    expected = sum(1.25 * F.mse_loss(h, x.detach()) for h in f_hats) / 3
    torch.testing.assert_close(out.loss, expected)
    g = torch.randn_like(x)
    (grad_x,) = torch.autograd.grad(out.quantized, x, g, retain_graph=True)
    assert torch.equal(grad_x, g)  # straight-through to the encoder
    out.loss.backward()
    assert q.codebook.grad.abs().sum() > 0
    assert all(q.phi[j].weight.grad.abs().sum() > 0 for j in q._phi_of_scale)


def test_contract_via_check_quantizer_and_registry():
    check_quantizer(create_quantizer("multiscale_residual", dim=4, codebook_size=16, patch_nums=(1, 2, 3)))


def test_mask_drops_whole_maps_from_loss_and_stats():
    q = _make((1, 2, 3)).train()
    x = q.example_input(4, torch.Generator().manual_seed(3))
    mask = torch.tensor([True, False, True, False])
    a, b = q(x, mask=mask), q(x[mask])
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.equal(a.indices[mask], b.indices) and torch.equal(a.stats["usage"], b.stats["usage"])


def test_state_dict_round_trip():
    a, b = _make((1, 2, 3), seed=0), _make((1, 2, 3), seed=1)
    x = a.example_input(2, torch.Generator().manual_seed(4))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.encode(x), b.encode(x)) and torch.equal(a(x).quantized, b(x).quantized)


def test_bad_input_raises_and_leaves_state_unchanged():
    q = _make((1, 2, 3))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    for bad in (torch.randn(2, 4, 4, 4), torch.randn(2, 5, 3, 3), torch.randn(2, 3, 3, 4),
                torch.full((1, 4, 3, 3), float("nan"))):
        with pytest.raises(ValueError, match="x"):
            q(bad)
    with pytest.raises(ValueError, match="mask"):
        q(torch.randn(2, 4, 3, 3), mask=torch.ones(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="indices"):
        q.decode(torch.zeros(2, 4, dtype=torch.int64))  # not a whole number of scales
    with pytest.raises(ValueError, match="indices"):
        q.decode(torch.full((2, 14), 16))
    with pytest.raises(ValueError, match="patch_nums"):
        MultiScaleResidualQuantizer(4, 16, patch_nums=(1, 0))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def _multiscale_utilization(dead_code) -> float:
    torch.manual_seed(0)
    q = MultiScaleResidualQuantizer(4, 64, patch_nums=(1, 2, 4), dead_code=dead_code)
    f = 6.0 + torch.randn(32, 4, 4, 4)  # residuals away from the random initial codes
    return utilization_after_training(q, f, torch.optim.Adam(q.parameters(), lr=1e-2), steps=5)


def test_dead_code_revival_keeps_the_shared_codebook_in_use():
    assert _multiscale_utilization(None) < 0.2  # without revival: a handful of codes, the rest never picked again
    assert _multiscale_utilization(DeadCodeConfig()) > 0.5

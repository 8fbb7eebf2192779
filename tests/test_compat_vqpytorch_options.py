"""The peer options and classes added behind quantkit.compat.vector_quantize_pytorch (issue 17), each against the
peer (a test dependency) with its weights copied by ``load_peer_state_dict``: same indices, same outputs."""
import pytest
import torch

import quantkit.compat.vector_quantize_pytorch as compat
from quantkit.quantizers import FSQ, ResidualQuantizer

peer = pytest.importorskip("vector_quantize_pytorch")

from test_compat_vqpytorch import _assert_same, _pair  # noqa: E402  (the side-by-side helpers)


# ----------------------------------------------------------------------------------------------------------------
# FSQ: preserve_symmetry, bound_hard_clamp; ResidualFSQ with the peer's numbers


@pytest.mark.parametrize("options", [dict(preserve_symmetry=True), dict(bound_hard_clamp=True),
                                     dict(preserve_symmetry=True, bound_hard_clamp=True),
                                     dict(preserve_symmetry=True, dim=16)],
                         ids=["symmetric", "hard_clamp", "both", "symmetric_projection"])
@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3, 4, 7]])
def test_fsq_options_match_peer(options, levels):
    if 2 in levels and not options.get("preserve_symmetry"):
        pytest.skip("the peer refuses level 2 without preserve_symmetry")
    torch.manual_seed(0)
    p, a = _pair("FSQ", levels=levels, **options)
    x = torch.randn(2, 300, options.get("dim", 4)) * 1.5
    out_p, out_a = p(x), a(x)
    _assert_same(out_p, out_a, atol=1e-6)  # the peer's round_ste is z + (round(z) - z), one ulp off round(z)
    torch.testing.assert_close(a.indices_to_codes(out_a[1]), p.indices_to_codes(out_p[1]), atol=1e-6, rtol=0)
    a.train(), p.train()  # no state: training gives the same numbers, and the same gradient
    xa, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    a(xa)[0].square().sum().backward()
    p(xp)[0].square().sum().backward()
    torch.testing.assert_close(xa.grad, xp.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", ["paper", "symmetric"])
@pytest.mark.parametrize("bound", ["tanh", "clamp"])
def test_native_fsq_grid_round_trips_and_codes_lie_on_the_grid(grid, bound):
    q = FSQ((2, 3, 4, 7), grid=grid, bound=bound) if grid == "symmetric" else FSQ((3, 4, 5, 8), bound=bound)
    x = torch.randn(500, 4) * 3
    out = q(x)
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert torch.equal(q.codes_to_indices(out.quantized), out.indices)
    all_codes = q.indices_to_codes(torch.arange(q.codebook_size))
    assert all_codes.abs().max() <= 1.0
    if grid == "symmetric":  # L values symmetric about zero, the extremes +-1 reached
        for i, L in enumerate(q.levels):
            values = torch.unique(all_codes[:, i])
            torch.testing.assert_close(values, torch.linspace(-1, 1, L))


def test_native_fsq_refuses_unknown_grid_and_bound():
    with pytest.raises(ValueError, match="grid"):
        FSQ((5, 5), grid="round")
    with pytest.raises(ValueError, match="bound"):
        FSQ((5, 5), bound="sigmoid")


@pytest.mark.parametrize("options", [dict(), dict(dim=16), dict(bound_hard_clamp=False),
                                     dict(bound_hard_clamp=False, soft_clamp_input_value=1.5)],
                         ids=["default", "projection", "tanh", "tanh_soft_clamp"])
def test_residual_fsq_matches_peer(options):
    torch.manual_seed(0)
    p, a = _pair("ResidualFSQ", levels=[8, 5, 5, 3], num_quantizers=4, **options)
    x = torch.randn(2, 200, options.get("dim", 4))
    out_p, out_a = p(x, return_all_codes=True), a(x, return_all_codes=True)
    _assert_same(out_p, out_a, atol=1e-6)
    torch.testing.assert_close(a.get_output_from_indices(out_a[1]), p.get_output_from_indices(out_p[1]),
                               atol=1e-6, rtol=0)


def test_residual_quantizer_per_channel_scale_and_input_clamp_validate():
    rq = ResidualQuantizer(3, "fsq", depth=2, levels=(5, 4, 3), layer_scale=[0.2, 0.25, 1 / 3], input_clamp=1.25)
    out = rq(torch.randn(50, 3) * 4)
    torch.testing.assert_close(rq.decode(out.indices), out.quantized)
    with pytest.raises(ValueError, match="layer_scale"):
        ResidualQuantizer(3, "fsq", depth=2, levels=(5, 4, 3), layer_scale=[0.2, 0.25])
    with pytest.raises(ValueError, match="input_clamp"):
        ResidualQuantizer(3, "fsq", depth=2, levels=(5, 4, 3), input_clamp=-1.0)


# ----------------------------------------------------------------------------------------------------------------
# LFQ: a per-sample mask on image feature maps (the peer raises "shape '[2, 32, 32]' is invalid")


def test_lfq_per_sample_mask_on_feature_maps_equals_the_kept_samples():
    torch.manual_seed(0)
    lfq = compat.LFQ(codebook_size=16, dim=4).train()
    x = torch.randn(3, 4, 8, 8)
    mask = torch.tensor([True, False, True])
    out = lfq(x, mask=mask)
    assert out.quantized.shape == x.shape and out.indices.shape == (3, 8, 8)
    kept = lfq(x[mask])
    torch.testing.assert_close(out.entropy_aux_loss, kept.entropy_aux_loss)  # masked-out samples take no part
    assert torch.equal(out.indices[mask], kept.indices)
    packed = lfq(x, mask=mask[:, None].expand(3, 64))  # the peer's (B, N) form still works
    torch.testing.assert_close(packed.entropy_aux_loss, kept.entropy_aux_loss)
    with pytest.raises(ValueError, match="mask"):
        lfq(x, mask=torch.ones(3, 5, dtype=torch.bool))

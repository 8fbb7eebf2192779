"""compat ``GroupedResidualFSQ`` / ``GroupedResidualLFQ`` against the peer's (a test dependency), weights copied by
``load_peer_state_dict``: the same eval outputs, indices, losses and decodes."""
import inspect

import pytest
import torch

import quantkit.compat.vector_quantize_pytorch as compat

peer = pytest.importorskip("vector_quantize_pytorch")


def _pair(name, **kwargs):
    torch.manual_seed(0)
    p = getattr(peer, name)(**kwargs)
    a = getattr(compat, name)(**kwargs).load_peer_state_dict(p.state_dict())
    return p.eval(), a.eval()


def _assert_same(out_p, out_a, atol):
    assert len(out_p) == len(out_a)
    for u, v in zip(out_p, out_a):
        if isinstance(u, tuple):  # the per-group codes
            _assert_same(u, v, atol)
            continue
        assert u.shape == v.shape and u.dtype == v.dtype
        if u.is_floating_point():
            torch.testing.assert_close(v, u, atol=atol, rtol=0)
        else:
            assert torch.equal(v, u)


@pytest.mark.parametrize("options", [dict(dim=8, groups=2, levels=[8, 5, 5, 5]),
                                     dict(dim=32, groups=2, levels=[5, 4, 3]),
                                     dict(dim=6, groups=3, levels=[3, 4], bound_hard_clamp=False,
                                          soft_clamp_input_value=2.0)],
                         ids=["no_projection", "projected", "tanh_soft_clamp"])
def test_grouped_residual_fsq_matches_peer_in_eval(options):
    p, a = _pair("GroupedResidualFSQ", num_quantizers=3, **options)
    x = torch.randn(2, 64, options["dim"]) * 1.5
    out_p, out_a = p(x, return_all_codes=True), a(x, return_all_codes=True)
    _assert_same(out_p, out_a, atol=1e-5)
    assert out_a[1].shape == (options["groups"], 2, 64, 3)
    torch.testing.assert_close(a.get_output_from_indices(out_a[1]), p.get_output_from_indices(out_p[1]),
                               atol=1e-5, rtol=0)


def test_grouped_residual_fsq_image_fmap_matches_peer():
    p, a = _pair("GroupedResidualFSQ", dim=8, groups=2, levels=[5, 5, 5, 5], num_quantizers=2,
                 accept_image_fmap=True, is_channel_first=True)
    x = torch.randn(2, 8, 5, 6)
    _assert_same(p(x), a(x), atol=1e-5)


@pytest.mark.parametrize("options", [dict(dim=8, groups=2, codebook_size=16),
                                     dict(dim=32, groups=2, codebook_size=2 ** 8, spherical=True),
                                     dict(dim=12, groups=3, codebook_size=16, commitment_loss_weight=0.25)],
                         ids=["no_projection", "projected_spherical", "commitment"])
def test_grouped_residual_lfq_matches_peer_in_eval_and_training_losses(options):
    p, a = _pair("GroupedResidualLFQ", num_quantizers=3, **options)
    x = torch.randn(2, 64, options["dim"])
    out_p, out_a = p(x, return_all_codes=True), a(x, return_all_codes=True)
    # the peer's per-level codes forget the sphere (its get_codes_from_indices reads the plain +-2^-d codebook)
    _assert_same(out_p[:3] if options.get("spherical") else out_p, out_a[:3] if options.get("spherical") else out_a,
                 atol=1e-5)
    torch.testing.assert_close(a.get_output_from_indices(out_a[1]), out_p[0], atol=1e-5, rtol=0)
    for rvq, codes, chunk in zip(a.rvqs, out_a[3], out_a[0].chunk(options["groups"], dim=-1)):
        torch.testing.assert_close(rvq.project_out(codes.sum(0)), chunk, atol=1e-5, rtol=0)  # levels add up
    p.train(), a.train()
    (q_p, i_p, l_p), (q_a, i_a, l_a) = p(x), a(x)
    assert torch.equal(i_a, i_p) and l_a.shape == l_p.shape == (options["groups"], 3)
    # quantkit spreads each group's summed loss evenly over its levels: the per-group sums match
    torch.testing.assert_close(l_a.sum(-1), l_p.sum(-1), atol=1e-4, rtol=1e-4)


def test_grouped_residual_lfq_mask_matches_peer():
    p, a = _pair("GroupedResidualLFQ", dim=8, groups=2, codebook_size=16, num_quantizers=2)
    p.train(), a.train()
    x = torch.randn(3, 20, 8)
    mask = torch.rand(3, 20) > 0.3
    (q_p, i_p, l_p), (q_a, i_a, l_a) = p(x, mask=mask), a(x, mask=mask)
    assert torch.equal(i_a, i_p)
    torch.testing.assert_close(q_a[mask], q_p[mask], atol=1e-6, rtol=0)
    # the loss is that of the kept vectors alone (the peer's is not: under a mask its LFQ averages the code
    # distribution over nothing, so its codebook entropy equals the per-sample one and the entropy loss is ~0)
    (_, i_kept, l_kept), (_, _, l_peer_kept) = a(x[mask][None]), p(x[mask][None])
    assert torch.equal(i_a[:, mask], i_kept[:, 0])
    torch.testing.assert_close(l_a, l_kept)
    torch.testing.assert_close(l_a.sum(-1), l_peer_kept.sum(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["GroupedResidualFSQ", "GroupedResidualLFQ"])
def test_grouped_signatures_and_errors(name):
    ours = list(inspect.signature(getattr(compat, name).forward).parameters)
    assert ours == list(inspect.signature(getattr(peer, name).forward).parameters)
    required = dict(levels=[5, 5]) if name == "GroupedResidualFSQ" else dict(codebook_size=4)
    with pytest.raises(ValueError, match="groups"):
        getattr(compat, name)(dim=6, groups=4, num_quantizers=2, **required)
    refused = "quantize_dropout_multiple_of"
    with pytest.raises(compat.UnsupportedKeywordError, match=refused):
        getattr(compat, name)(dim=4, groups=2, num_quantizers=2, **{refused: 2}, **required)

"""LFQ's input_clamp and EntropyLoss(softplus_offset): natively against closed forms, and as the peer's
soft_clamp_input_value / experimental_softplus_entropy_loss through the compat adapters, against the peer."""
import pytest
import torch
import torch.nn.functional as F

from quantkit import testing
from quantkit.quantizers import LFQ, EntropyLoss


def test_input_clamp_and_softplus_offset_are_the_closed_forms():
    torch.manual_seed(0)
    x = torch.randn(300, 6, dtype=torch.float64) * 3
    plain = LFQ(codebook_size=64, commitment_weight=0.5, entropy=EntropyLoss(weight=0.2))
    q = LFQ(codebook_size=64, commitment_weight=0.5, input_clamp=2.0,
            entropy=EntropyLoss(weight=0.2, softplus_offset=3.0))
    clamped = 2.0 * torch.tanh(x / 2.0)
    sample, batch = plain.entropy_terms(clamped)
    codes = plain.indices_to_codes(plain.encode(clamped), torch.float64)
    expected = 0.5 * (clamped - codes).square().mean() + 0.2 * F.softplus(sample - batch + 3.0)
    out = q.train()(x)
    torch.testing.assert_close(out.loss, expected.float())
    assert torch.equal(out.indices, plain.encode(x))  # the clamp keeps every sign
    with pytest.raises(ValueError, match="input_clamp"):
        LFQ(codebook_size=64, codebook_scale=2.0, input_clamp=1.0)


def test_straight_through_activation_shapes_only_the_gradient():
    torch.manual_seed(0)
    q = LFQ(codebook_size=16, straight_through_activation=torch.nn.Tanh()).train()
    x = torch.randn(50, 4, dtype=torch.float64, requires_grad=True)
    out = q(x)
    assert torch.equal(out.quantized, q.decode(out.indices).double())
    (grad,) = torch.autograd.grad(out.quantized.sum(), x)
    torch.testing.assert_close(grad, 1 - torch.tanh(x.detach()).square())  # d tanh / dx, not 1
    assert not q.identity_gradient


def test_clamped_lfq_passes_check_quantizer():
    make = lambda: LFQ(dim=8, codebook_size=64, input_clamp=1.5, entropy=EntropyLoss(softplus_offset=5.0))  # noqa: E731
    torch.manual_seed(0)
    testing.check_quantizer(make(), make=make)


peer = pytest.importorskip("vector_quantize_pytorch")
import quantkit.compat.vector_quantize_pytorch as compat  # noqa: E402
from test_compat_vqpytorch import _assert_same, _pair  # noqa: E402  (the side-by-side helpers)


@pytest.mark.parametrize("name, options", [
    ("LFQ", dict(dim=8, codebook_size=2 ** 8, soft_clamp_input_value=1.5, commitment_loss_weight=0.25)),
    ("LFQ", dict(dim=16, codebook_size=2 ** 6, experimental_softplus_entropy_loss=True, entropy_loss_offset=2.0,
                 spherical=True)),
    ("ResidualLFQ", dict(dim=8, codebook_size=2 ** 8, num_quantizers=3, soft_clamp_input_value=1.5,
                         commitment_loss_weight=0.25, experimental_softplus_entropy_loss=True)),
    ("LFQ", dict(dim=16, codebook_size=2 ** 8, cosine_sim_project_in=True, cosine_sim_project_in_scale=2.0,
                 commitment_loss_weight=0.25)),
    ("LFQ", dict(dim=8, codebook_size=2 ** 8, straight_through_activation=torch.nn.Tanh())),
], ids=["lfq_clamp", "lfq_softplus_spherical", "residual_clamp_softplus", "lfq_cosine_projection", "lfq_tanh_st"])
def test_lfq_options_match_peer(name, options):
    torch.manual_seed(0)
    p = getattr(peer, name)(**options)
    a = getattr(compat, name)(**options).load_peer_state_dict(p.state_dict())
    x = torch.randn(2, 128, options["dim"]) * 2
    p.eval(), a.eval()
    out_p, out_a = p(x), a(x)
    assert torch.equal(out_a[1], out_p[1])
    torch.testing.assert_close(out_a[0], out_p[0], atol=1e-5, rtol=0)
    p.train(), a.train()
    xp, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_p, out_a = p(xp), a(xa)
    assert torch.equal(out_a[1], out_p[1])
    torch.testing.assert_close(out_a[2].sum(), out_p[2].sum(), atol=1e-4, rtol=1e-4)
    if name == "ResidualLFQ":
        return  # quantkit's residual output reaches x through the first level only (docs: differs on purpose)
    (out_p[0].square().sum() + out_p[2].sum()).backward()
    (out_a[0].square().sum() + out_a[2].sum()).backward()
    torch.testing.assert_close(xa.grad, xp.grad, atol=1e-4, rtol=1e-3)
    if a.has_projections:
        torch.testing.assert_close(a.project_in.weight.grad, p.project_in.weight.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name, options", [
    ("LFQ", dict(dim=8, codebook_size=2 ** 8, commitment_loss_weight=0.25)),
    ("LFQ", dict(dim=12, codebook_size=2 ** 4, num_codebooks=2, spherical=True)),
    ("ResidualLFQ", dict(dim=8, codebook_size=2 ** 8, num_quantizers=2)),
], ids=["lfq", "lfq_two_codebooks_spherical", "residual"])
def test_orthogonal_rotation_matches_peer(name, options):
    p, a = _pair(name, orthogonal_rotation=True, **options)  # eval, the peer's R copied
    x = torch.randn(2, 128, options["dim"])
    out_p, out_a = p(x), a(x)
    _assert_same(out_p[:2], out_a[:2], atol=1e-5)
    if name == "LFQ":
        torch.testing.assert_close(a.indices_to_codes(out_a[1]), p.indices_to_codes(out_p[1]), atol=1e-5, rtol=0)
        p.train(), a.train()
        (_, br_p), (_, br_a) = p(x, return_loss_breakdown=True), a(x, return_loss_breakdown=True)
        torch.testing.assert_close(br_a.per_sample_entropy, br_p.per_sample_entropy, atol=1e-5, rtol=1e-4)
        if options.get("commitment_loss_weight"):
            torch.testing.assert_close(br_a.commitment, br_p.commitment, atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(a.get_output_from_indices(out_a[1]), out_a[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="orthogonal_rot"):
        getattr(compat, name)(**options).load_peer_state_dict(p.state_dict())



def test_cosine_projection_needs_a_projection_to_replace():
    with pytest.raises(ValueError, match="cosine_projection"):
        LFQ(codebook_size=16, cosine_projection=1.0)


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("name, options", [
    # each of the peer's terms is a mean over the codebooks (its codebook entropy too): GroupedQuantizer(mean)
    ("LFQ", dict(dim=12, codebook_size=2 ** 6, num_codebooks=3)),
    # level d's commitment and entropy temperature are rescaled by 4^-d / 4^d: quantkit's level sees the residual
    # times 2^d against codes +-1, the peer's the residual against codes +-2^-d
    ("ResidualLFQ", dict(dim=8, codebook_size=2 ** 8, num_quantizers=4)),
], ids=["three_codebooks", "residual"])
def test_training_losses_are_the_peers(name, options, spherical):
    p, a = _pair(name, commitment_loss_weight=0.25, spherical=spherical, **options)
    p.train(), a.train()
    x = torch.randn(2, 100, options["dim"])
    if name == "ResidualLFQ":
        (_, i_p, l_p), (_, i_a, l_a) = p(x), a(x)
        assert torch.equal(i_a, i_p)
        torch.testing.assert_close(l_a.sum(), l_p.sum(), atol=1e-5, rtol=1e-4)
        return
    (ret_p, br_p), (ret_a, br_a) = p(x, return_loss_breakdown=True), a(x, return_loss_breakdown=True)
    assert torch.equal(ret_a.indices, ret_p.indices)
    for u, v in zip((ret_p.entropy_aux_loss, *br_p), (ret_a.entropy_aux_loss, *br_a)):
        torch.testing.assert_close(v, u, atol=1e-5, rtol=1e-4)
    # with a mask: the loss of the kept vectors (the peer's masked entropy is degenerate: docs, peer bugs)
    mask = torch.rand(2, 100) > 0.2
    torch.testing.assert_close(a(x, mask=mask).entropy_aux_loss, a(x[mask][None]).entropy_aux_loss)

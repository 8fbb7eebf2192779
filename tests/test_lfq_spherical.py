"""LFQ's spherical option (BSQ, Zhao et al. 2024, arXiv:2406.07548): natively against closed forms, and through the
compat adapter against the peer (a test dependency) with its weights copied: same indices, outputs and losses."""
import math

import pytest
import torch

from quantkit import testing
from quantkit.quantizers import LFQ, EntropyLoss, ResidualQuantizer


def test_bsq_codes_lie_on_the_sphere_and_are_the_sign_vectors():
    q = LFQ(codebook_size=2 ** 6, codebook_scale=1.5, spherical=True).eval()
    codes = q.indices_to_codes(torch.arange(64), torch.float64)
    torch.testing.assert_close(codes.norm(dim=-1), torch.full((64,), 1.5, dtype=torch.float64))
    torch.testing.assert_close(codes.abs(), torch.full((64, 6), 1.5 / math.sqrt(6), dtype=torch.float64))
    x = torch.randn(500, 6, dtype=torch.float64) * 3
    out = q(x)
    # the index is the nearest code on the sphere (float64 brute force), and decode gives the output
    nearest = torch.cdist(q.to_sphere(x), codes).argmin(-1)
    assert torch.equal(out.indices, nearest)
    out32 = q(x.float())  # decode is float32: the float32 forward gives the same numbers
    assert torch.equal(out32.indices, out.indices) and torch.equal(q.decode(out.indices), out32.quantized)


def test_bsq_entropy_terms_equal_the_brute_force_softmax_over_the_sphere_codes():
    q = LFQ(codebook_size=2 ** 5, spherical=True, entropy=EntropyLoss(temperature=0.1))
    x = torch.randn(64, 5, dtype=torch.float64)
    h = q.to_sphere(x)
    codes = q.indices_to_codes(torch.arange(32), torch.float64)
    p = torch.softmax(-torch.cdist(h, codes).square() / 0.1, dim=-1)  # (N, 32)
    sample = -(p * p.log()).sum(-1).mean()
    mean = p.mean(0)
    batch = -(mean * mean.log()).sum()
    got_sample, got_batch = q.entropy_terms(x)
    torch.testing.assert_close(got_sample, sample)
    torch.testing.assert_close(got_batch, batch)


@pytest.mark.parametrize("dim", [6, 10])
def test_bsq_passes_check_quantizer(dim):
    torch.manual_seed(0)
    make = lambda: LFQ(dim=dim, codebook_size=2 ** 6, spherical=True)  # noqa: E731
    testing.check_quantizer(make(), make=make)


def test_residual_bsq_passes_check_quantizer():
    make = lambda: ResidualQuantizer(6, "lfq", depth=3, codebook_size=2 ** 6, layer_scale=0.5, spherical=True)  # noqa: E731
    testing.check_quantizer(make(), make=make)


# ----------------------------------------------------------------------------------------------------------------
# against the peer

peer = pytest.importorskip("vector_quantize_pytorch")
import quantkit.compat.vector_quantize_pytorch as compat  # noqa: E402


def _pair(name, **kwargs):
    torch.manual_seed(0)
    p = getattr(peer, name)(**kwargs)
    a = getattr(compat, name)(**kwargs).load_peer_state_dict(p.state_dict())
    return p, a


@pytest.mark.parametrize("options", [dict(dim=8, codebook_size=2 ** 8), dict(dim=16, codebook_size=2 ** 6),
                                     dict(dim=8, codebook_size=2 ** 8, codebook_scale=2.0)],
                         ids=["plain", "projected", "scaled"])
def test_spherical_lfq_matches_peer_in_eval_and_training(options):
    p, a = _pair("LFQ", spherical=True, commitment_loss_weight=0.25, **options)
    x = torch.randn(2, 200, options["dim"])
    p.eval(), a.eval()
    (q_p, i_p, _), (q_a, i_a, _) = p(x), a(x)
    assert torch.equal(i_a, i_p)
    torch.testing.assert_close(q_a, q_p, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.indices_to_codes(i_a), p.indices_to_codes(i_p), atol=1e-6, rtol=0)
    p.train(), a.train()
    xp, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ret_p, br_p), (ret_a, br_a) = p(xp, return_loss_breakdown=True), a(xa, return_loss_breakdown=True)
    assert torch.equal(ret_a.indices, ret_p.indices)
    for u, v in zip(br_p, br_a):  # per-sample entropy, codebook entropy, commitment
        torch.testing.assert_close(v, u, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ret_a.entropy_aux_loss, ret_p.entropy_aux_loss, atol=1e-4, rtol=1e-4)
    (ret_p.quantized.square().sum() + ret_p.entropy_aux_loss).backward()
    (ret_a.quantized.square().sum() + ret_a.entropy_aux_loss).backward()
    torch.testing.assert_close(xa.grad, xp.grad, atol=1e-4, rtol=1e-3)


def test_spherical_lfq_with_two_codebooks_matches_peer_in_eval():
    # (in training the adapter's codebook entropy is over both groups together, the peer's a mean over groups)
    p, a = _pair("LFQ", dim=8, codebook_size=2 ** 4, num_codebooks=2, codebook_scale=2.0, spherical=True)
    x = torch.randn(2, 8, 5, 6)  # an image feature map, channel-first
    p.eval(), a.eval()
    (q_p, i_p, _), (q_a, i_a, _) = p(x), a(x)
    assert torch.equal(i_a, i_p)
    torch.testing.assert_close(q_a, q_p, atol=1e-6, rtol=0)


def test_spherical_residual_lfq_matches_peer_in_eval():
    p, a = _pair("ResidualLFQ", dim=8, codebook_size=2 ** 8, num_quantizers=3, spherical=True)
    x = torch.randn(2, 100, 8)
    p.eval(), a.eval()
    (q_p, i_p, _), (q_a, i_a, _) = p(x), a(x)
    assert torch.equal(i_a, i_p)
    torch.testing.assert_close(q_a, q_p, atol=1e-6, rtol=0)
    # decoding gives the forward output (the peer's get_output_from_indices forgets the sphere: off by up to 1.1)
    torch.testing.assert_close(a.get_output_from_indices(i_a), q_p, atol=1e-6, rtol=0)

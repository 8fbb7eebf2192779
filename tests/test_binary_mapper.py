"""Native BinaryMapper (Free Transformer, arXiv:2510.17558): the sampled bits' distribution, the straight-through
one-hot and its agreement with ``quantized``, the free-bits KL against closed forms, and its sampling variants."""
import math

import pytest
import torch

from quantkit import testing
from quantkit.quantizers import BinaryMapper


def test_training_bits_follow_the_tempered_bernoulli_and_eval_thresholds():
    torch.manual_seed(0)
    q = BinaryMapper(3, temperature=2.0).train()
    logits = torch.tensor([-2.0, 0.5, 3.0])
    out = q(logits.expand(40000, 3))
    freq = q.indices_to_bits(out.indices).float().mean(0)
    torch.testing.assert_close(freq, torch.sigmoid(logits / 2.0), atol=0.01, rtol=0)
    assert torch.equal(out.quantized, q.indices_to_codes(out.indices))  # codes are the sampled bits as +-1
    q.eval()
    assert bool((q(logits.expand(5, 3)).indices == 0b110).all())  # bit i is 2^i: bits 1 and 2 positive


def test_quantized_gradient_is_the_straight_through_one_hot_times_the_codebook():
    torch.manual_seed(1)
    q = BinaryMapper(4).train()
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    out = q(logits)
    one_hot = q.one_hot(out.indices, logits)  # (6, 16), gradient through G
    codebook = q.indices_to_codes(torch.arange(16), torch.float64)  # (16, 4) +-1
    torch.testing.assert_close(one_hot.detach(), torch.nn.functional.one_hot(out.indices, 16).double())
    g = torch.randn(6, 4, dtype=torch.float64)
    (grad_q,) = torch.autograd.grad(out.quantized, logits, g)
    (grad_h,) = torch.autograd.grad(one_hot @ codebook, logits, g)
    torch.testing.assert_close(grad_q, grad_h)
    # G is the product of the bit probabilities: brute force over the 16 codes
    p = torch.sigmoid(logits.detach())
    bits = q.indices_to_bits(torch.arange(16)).double()
    brute = torch.prod(torch.where(bits.bool(), p[:, None], 1 - p[:, None]), -1)  # (6, 16)
    g_code = torch.randn(6, 16, dtype=torch.float64)
    (grad_g,) = torch.autograd.grad((q.one_hot(out.indices, logits) * g_code).sum(), logits)
    lg = logits.detach().clone().requires_grad_()
    pp = torch.sigmoid(lg)
    (grad_brute,) = torch.autograd.grad((torch.prod(torch.where(bits.bool(), pp[:, None], 1 - pp[:, None]), -1)
                                         * g_code).sum(), lg)
    torch.testing.assert_close(grad_g, grad_brute)
    torch.testing.assert_close(q.log_prob(logits.detach(), out.indices), brute[torch.arange(6), out.indices].log())


def test_kl_loss_is_free_below_the_threshold_and_equals_the_closed_form():
    q = BinaryMapper(3, kl_weight=0.5).train()
    logits = torch.tensor([[0.0, 0.0, 0.0], [4.0, -3.0, 0.5]], dtype=torch.float64)
    p = torch.sigmoid(logits)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum(-1)
    kl = (3 * math.log(2) - entropy - math.log(2)).clamp_min(0)
    assert float(kl[0]) == 0.0  # uniform bits: KL 0, free
    torch.testing.assert_close(q.kl_loss(logits, reduce=False), kl)
    torch.testing.assert_close(q(logits).loss, 0.5 * kl.mean().float())
    assert float(q.eval()(logits).loss) == 0.0


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="dim"):
        BinaryMapper(0)
    with pytest.raises(ValueError, match="sampling"):
        BinaryMapper(4, sampling="sometimes")
    with pytest.raises(ValueError, match="temperature"):
        BinaryMapper(4, temperature=0.0)


@pytest.mark.parametrize("options", [dict(sampling="never", temperature=0.5), dict(dim=6, kl_weight=0.0)],
                         ids=["never_sample", "six_bits_no_kl"])
def test_binary_mapper_variants_pass_check_quantizer(options):
    make = lambda: BinaryMapper(**{"dim": 4, **options})  # noqa: E731
    torch.manual_seed(0)
    testing.check_quantizer(make(), make=make)

"""Native FSP (finite scalar perturbation, arXiv:2602.17133): bins against a float64 reference, the perturbation's
distribution, the moment loss against closed forms, and its option variants through ``check_quantizer``."""
import math

import pytest
import torch

from quantkit import testing
from quantkit.quantizers import FSP, MomentLoss
from quantkit.quantizers.fsp import CDFS

LEVELS = (5, 4, 3)


@pytest.mark.parametrize("cdf", sorted(CDFS))
def test_cdf_and_inverse_round_trip_and_cdf_is_increasing_into_unit_interval(cdf):
    forward, inverse = CDFS[cdf]
    z = torch.linspace(-4, 4, 801, dtype=torch.float64)
    p = forward(z)
    assert bool((p >= 0).all() and (p <= 1).all() and (p.diff() > 0).all())
    torch.testing.assert_close(inverse(p), z, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("invert_cdf", [False, True])
def test_eval_bins_codes_and_indices_equal_the_float64_reference(invert_cdf):
    q = FSP(LEVELS, cdf="normal", invert_cdf=invert_cdf).eval()
    x = torch.randn(2000, 3) * 2
    out = q(x)
    xd = x.double()
    p = 0.5 * (1 + torch.erf(xd / math.sqrt(2)))
    levels = torch.tensor(LEVELS, dtype=torch.float64)
    digits = (p * levels).floor().clamp_max(levels - 1)  # (N, 3)
    index = digits[:, 0] + 5 * digits[:, 1] + 20 * digits[:, 2]
    mid = (digits + 0.5) / levels
    codes = math.sqrt(2) * torch.erfinv(2 * mid - 1) if invert_cdf else (mid - 0.5) * math.sqrt(12)
    assert torch.equal(out.indices, index.long())
    torch.testing.assert_close(out.quantized.double(), codes, atol=1e-6, rtol=1e-6)
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert out.quantized.unique().numel() <= sum(LEVELS)


def test_linear_codes_of_a_uniform_bin_have_unit_variance():
    q = FSP((7,), cdf="sigmoid")
    codes = q.indices_to_codes(torch.arange(7), torch.float64)[:, 0]
    # midpoints of 7 equal bins of U(0, 1), times sqrt(12): variance 1 - 1 / L^2 (the within-bin part is lost)
    torch.testing.assert_close(codes.var(unbiased=False), torch.tensor(1 - 1 / 49, dtype=torch.float64))


def test_training_perturbation_is_uniform_over_one_bin_and_keeps_the_index():
    torch.manual_seed(0)
    q = FSP((4,), cdf="tanh", quantize_rate=0.0, moments="none").train()
    x = torch.full((20000, 1), 0.3)  # CDF value 0.6456, in bin 2 of 4, away from 0 and 1
    out = q(x)
    p = (math.tanh(0.3) + 1) / 2
    values = out.quantized[:, 0].double() * (1 / math.sqrt(12)) + 0.5  # back to [0, 1]
    offsets = (values - p) * 8  # U(-1, 1) when the noise spans one bin, 1 / L wide
    assert float(offsets.abs().max()) <= 1.0 + 1e-5
    assert abs(float(offsets.mean())) < 0.03 and abs(float(offsets.var()) - 1 / 3) < 0.02
    assert bool((out.indices == 2).all())  # the index is the bin's, perturbed or not
    assert float(out.stats["accept_rate"]) == 1.0


def test_quantize_rate_is_the_share_of_rounded_elements():
    torch.manual_seed(1)
    q = FSP((5, 5), quantize_rate=0.3, moments="none").train()
    x = torch.randn(20000, 2)
    out = q(x)
    rounded = torch.isclose(out.quantized, q.decode(out.indices), atol=1e-6, rtol=0).float().mean()
    assert abs(float(rounded) - 0.3) < 0.02
    q.eval()
    assert torch.equal(q(x).quantized, q.decode(out.indices))  # eval always rounds


def test_moment_loss_equals_the_closed_form():
    torch.manual_seed(2)
    h = torch.randn(300, 4, dtype=torch.float64) * 1.5 + 0.2
    loss = MomentLoss.preset("kurt")
    mean, var = h.mean(0), h.var(0)
    std = (h - mean) / var.sqrt()
    skew, kurt = std.pow(3).mean(0), std.pow(4).mean(0) - 3
    expected = (0.1 * mean.square().mean() + 0.07 * (var - 1).square().mean() + 0.06 * skew.square().mean()
                + 0.05 * kurt.square().mean())
    torch.testing.assert_close(loss(h), expected)
    assert float(MomentLoss.preset("none")(h)) == 0.0
    assert float(loss(h[:1])) == 0.0  # one vector has no variance: zero, not NaN
    q = FSP((5, 5), moments="var_tanh").eval()
    torch.testing.assert_close(q(h.float()[:, :2]).loss, MomentLoss.preset("var_tanh")(h.float()[:, :2]))


def test_bad_options_raise_naming_them():
    with pytest.raises(ValueError, match="cdf"):
        FSP(LEVELS, cdf="gumbel")
    with pytest.raises(ValueError, match="quantize_rate"):
        FSP(LEVELS, quantize_rate=1.5)
    with pytest.raises(ValueError, match="preset"):
        FSP(LEVELS, moments="skew")
    with pytest.raises(ValueError, match="levels"):
        FSP((5, 1))


@pytest.mark.parametrize("options", [dict(dim=6, quantize_rate=0.5), dict(invert_cdf=True, cdf="laplace"),
                                     dict(cdf="cauchy", dim=5, invert_cdf=True, moments="kurt")],
                         ids=["projected_half_rate", "inverse_laplace", "inverse_cauchy_projected"])
def test_fsp_option_variants_pass_check_quantizer(options):
    make = lambda: FSP(LEVELS, **options)  # noqa: E731
    torch.manual_seed(0)
    testing.check_quantizer(make(), make=make)

"""FSQ: the implicit codebook is a bijection, bounded rounding reaches every code, and the Quantizer contract."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from quantkit import FSQ, create_quantizer

levels_st = st.lists(st.integers(2, 8), min_size=1, max_size=4).filter(lambda lv: math.prod(lv) <= 4096)


def _input_for_integers(q: FSQ, integers: torch.Tensor) -> torch.Tensor:
    """Inverts the bound: an input whose bound(x) equals the given grid integers (N, d), in float64."""
    lv = torch.tensor(q.levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = (1 - lv % 2) / 2
    return torch.atanh((integers + offset) / half_l) - torch.atanh(offset / half_l)


@given(levels_st)
def test_index_code_map_is_a_bijection_over_the_whole_codebook(levels):
    q = FSQ(levels)
    assert q.codebook_size == math.prod(levels)
    idx = torch.arange(q.codebook_size)
    codes = q.indices_to_codes(idx)  # (K, d)
    assert torch.unique(codes, dim=0).shape[0] == q.codebook_size
    assert codes.abs().max() <= 1
    for i, L in enumerate(levels):  # each channel takes exactly L values
        assert torch.unique(codes[:, i]).numel() == L
    assert torch.equal(q.codes_to_indices(codes), idx)
    assert torch.equal(q.digits_to_indices(q.indices_to_digits(idx)), idx)


@given(levels_st)
def test_bounded_rounding_reaches_every_code_and_indexes_it(levels):
    q = FSQ(levels).eval()
    idx = torch.arange(q.codebook_size)
    integers = q.indices_to_digits(idx) - torch.tensor(q.levels) // 2
    x = _input_for_integers(q, integers.double())
    out = q(x)
    assert torch.equal(out.indices, idx)
    assert torch.equal(out.quantized, q.indices_to_codes(idx, torch.float64))


@given(levels_st, st.integers(0, 2 ** 31 - 1))
def test_eval_round_trip_and_index_range(levels, seed):
    q = FSQ(levels).eval()
    x = torch.randn(3, 17, len(levels), generator=torch.Generator().manual_seed(seed)) * 3
    out = q(x)
    assert out.indices.dtype == torch.int64 and out.indices.shape == (3, 17)
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < q.codebook_size
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert torch.equal(q.encode(x), out.indices)
    assert out.loss.dtype == torch.float32 and float(out.loss) == 0.0


def test_even_levels_use_the_offset_grid():
    q = FSQ([4])
    x = torch.linspace(-20, 20, 2001)[:, None]
    values = torch.unique(q(x).quantized)
    assert torch.equal(values, torch.tensor([-1.0, -0.5, 0.0, 0.5]))
    assert float(q(torch.zeros(1, 1)).quantized) == 0.0  # bound(0) == 0


def test_gradient_is_the_bound_derivative_straight_through_the_rounding():
    q = FSQ([5, 4])
    x = torch.randn(64, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(q(x).quantized.sum(), x)
    xb = x.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad((q.bound(xb) / torch.tensor([2.0, 2.0], dtype=torch.float64)).sum(), xb)
    torch.testing.assert_close(g, expected)


def test_projections_channel_first_round_trip_and_state_dict():
    q = FSQ([8, 5, 5, 5], dim=6, channel_first=True).eval()
    x = torch.randn(2, 6, 5, 3)
    out = q(x)
    assert out.quantized.shape == x.shape and out.indices.shape == (2, 5, 3)
    assert torch.equal(q.decode(out.indices), out.quantized)
    q2 = FSQ([8, 5, 5, 5], dim=6, channel_first=True).eval()
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.encode(x), out.indices)
    assert set(q.state_dict()) == {"project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias"}


def test_half_precision_inputs_give_float32_indices():
    q = FSQ([7, 5, 5]).eval()
    x = (torch.randn(256, 3) * 2).to(torch.bfloat16)
    out = q(x)
    assert out.quantized.dtype == torch.bfloat16
    assert torch.equal(out.indices, q(x.float()).indices)


def test_mask_changes_nothing():
    q = FSQ([5, 5], dim=4)
    x = torch.randn(10, 4)
    mask = torch.rand(10) > 0.5
    a, b = q(x), q(x, mask=mask)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)
    assert torch.equal(b.stats["usage"], q(x[mask]).stats["usage"])


@pytest.mark.parametrize("levels", [[1], [], [3, 0], [2.5], "abc"])
def test_bad_levels_raise_naming_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        FSQ(levels)


def test_bad_input_raises_and_leaves_state_unchanged():
    q = FSQ([5, 5], dim=4)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    for bad in (torch.randn(3, 5), torch.full((3, 4), float("nan")), torch.ones(3, 4, dtype=torch.int64)):
        with pytest.raises(ValueError, match="x"):
            q(bad)
    with pytest.raises(ValueError, match="indices"):
        q.decode(torch.tensor([q.codebook_size]))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_registry_and_compiled_eval_forward_matches_eager():
    q = create_quantizer("fsq", levels=(8, 5, 5, 5), dim=8).eval()
    x = torch.randn(4, 16, 8)
    compiled = torch.compile(q, fullgraph=True, dynamic=False, backend="aot_eager")  # inductor: minutes on 2 cores
    eager, comp = q(x), compiled(x)
    assert torch.equal(comp.indices, eager.indices)
    torch.testing.assert_close(comp.quantized, eager.quantized)


# ----------------------------------------------------------------------------------------------------------------
# noise substitution (noise_dropout): training only, never changes a code choice, one step of uniform noise


def _grid_codes(q: FSQ, x: torch.Tensor) -> torch.Tensor:
    return q.eval()(x).quantized


def test_noise_dropout_zero_is_plain_fsq_in_training():
    x = torch.randn(64, 4) * 2
    plain, noisy_off = FSQ([8, 5, 5, 5]).train(), FSQ([8, 5, 5, 5], noise_dropout=0.0).train()
    assert torch.equal(plain(x).quantized, noisy_off(x).quantized)


def test_full_noise_moves_every_code_by_at_most_half_a_step_and_keeps_the_indices():
    q = FSQ([8, 5, 5, 5], noise_dropout=1.0)
    x = torch.randn(512, 4) * 2
    torch.manual_seed(0)
    train = q.train()(x)
    rounded = _grid_codes(q, x)
    half = torch.tensor(q.levels) // 2  # codes are grid integers / (L // 2)
    bounded = q.bound(x) / half
    assert torch.equal(train.indices, q.encode(x))  # the index is the rounded value's
    err = (train.quantized - bounded) * half  # in grid steps
    assert float(err.abs().max()) <= 0.5 + 1e-6
    assert float(err.std()) > 0.2  # roughly U(-1/2, 1/2): std 0.29; plain rounding would give |err| = 0 nowhere
    assert float((train.quantized != rounded).float().mean()) > 0.99


def test_noise_dropout_substitutes_about_its_share_and_eval_always_rounds():
    q = FSQ([8, 5, 5, 5], noise_dropout=0.3)
    x = torch.randn(4096, 4) * 2
    torch.manual_seed(0)
    share = float((q.train()(x).quantized != _grid_codes(q, x)).float().mean())
    assert abs(share - 0.3) < 0.03
    out = q.eval()(x)
    assert torch.equal(q.decode(out.indices), out.quantized)  # eval round trip, as without noise


def test_noise_keeps_the_bound_gradient():
    x = (torch.randn(256, 4) * 2).requires_grad_()
    grads = []
    for p in (0.0, 1.0):
        q = FSQ([8, 5, 5, 5], noise_dropout=p).train()
        (g,) = torch.autograd.grad(q(x).quantized.sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("p", [-0.1, 1.5, True, "0.5", float("nan")])
def test_bad_noise_dropout_raises_naming_it(p):
    with pytest.raises(ValueError, match="noise_dropout"):
        FSQ([5, 5], noise_dropout=p)

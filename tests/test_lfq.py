"""LFQ and its exact entropies: bit codes are a bijection, the chunked codebook entropy equals a brute force over all
2^d codes (value and gradient, float64), the per-sample entropy factorizes, and the Quantizer contract."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from quantkit import LFQ, create_quantizer
from quantkit.quantizers.entropy import code_distribution, codebook_entropy, per_sample_entropy


def _all_codes(bits: int, scale: float = 1.0) -> torch.Tensor:
    """(2^bits, bits) float64 codes, index = sum_i bit_i 2^i."""
    j = torch.arange(2 ** bits)[:, None]
    return (((j >> torch.arange(bits)) & 1) * 2 - 1).double() * scale


def _brute_probs(h: torch.Tensor, temperature: float, scale: float = 1.0) -> torch.Tensor:
    """softmax_c(-||h - c||^2 / t) over every code: (N, 2^bits); ||c||^2 is the same for every code, so the
    logits are 2 h.c / t up to a per-row constant."""
    return torch.softmax(2 * h @ _all_codes(h.shape[1], scale).T / temperature, dim=-1)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


@given(st.integers(1, 12))
def test_index_code_map_is_a_bijection_over_the_whole_codebook(bits):
    q = LFQ(codebook_size=2 ** bits).eval()
    idx = torch.arange(q.codebook_size)
    codes = q.indices_to_codes(idx)
    assert torch.unique(codes, dim=0).shape[0] == q.codebook_size
    assert torch.equal(codes.double(), _all_codes(bits))
    out = q(codes)  # every code quantizes to itself, with its own index
    assert torch.equal(out.indices, idx) and torch.equal(out.quantized, codes)
    assert torch.equal(q.decode(idx), codes)


@settings(max_examples=25)
@given(st.integers(1, 10), st.integers(1, 24), st.integers(1, 30), st.sampled_from([0.05, 0.5, 3.0]),
       st.integers(0, 2 ** 31 - 1))
def test_codebook_entropy_is_exact_against_brute_force_with_gradients(bits, n, chunk, temperature, seed):
    h = torch.randn(n, bits, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    h.requires_grad_(True)
    logits = 4 * h / temperature  # p(bit = 1) of softmax(-||h - c||^2 / t)
    probs = _brute_probs(h, temperature)  # (n, 2^bits)
    expected = _entropy(probs.mean(0))
    got = codebook_entropy(logits, chunk_size=chunk)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(code_distribution(logits, chunk_size=chunk), probs.mean(0), rtol=1e-9, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, h)
    (g_exp,) = torch.autograd.grad(expected, h)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-7, atol=1e-9)


@given(st.integers(1, 10), st.sampled_from([0.01, 0.3, 2.0]), st.integers(0, 2 ** 31 - 1))
def test_per_sample_entropy_factorizes_exactly_per_bit(bits, temperature, seed):
    h = torch.randn(16, bits, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(per_sample_entropy(4 * h / temperature), _entropy(_brute_probs(h, temperature)),
                               rtol=1e-9, atol=1e-9)


def test_codebook_entropy_at_2_to_the_18_is_a_distribution_over_every_code():
    logits = torch.randn(300, 18) * 3
    p = code_distribution(logits, chunk_size=128)
    assert p.shape == (2 ** 18,)
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    h = codebook_entropy(logits, chunk_size=128)
    assert 0 < float(h) <= 18 * math.log(2)
    torch.testing.assert_close(h, -(p * p.clamp_min(1e-30).log()).sum(), rtol=1e-4, atol=1e-4)


def test_training_loss_is_commitment_plus_weighted_entropy_terms():
    q = LFQ(codebook_size=2 ** 6, commitment_weight=0.25,
            entropy=dict(weight=0.1, temperature=0.2, sample_weight=1.0, codebook_weight=0.7)).double()
    z = torch.randn(50, 6, dtype=torch.float64)
    loss = q(z).loss
    codes = torch.where(z > 0, 1.0, -1.0).double()
    probs = _brute_probs(z, 0.2)
    expected = 0.25 * F.mse_loss(z, codes) + 0.1 * (_entropy(probs).mean() - 0.7 * _entropy(probs.mean(0)))
    torch.testing.assert_close(loss, expected.float())
    q.eval()  # eval: the entropy regularizer is a training term
    torch.testing.assert_close(q(z).loss, (0.25 * F.mse_loss(z, codes)).float())


def test_mask_equals_the_truncated_batch():
    q = LFQ(dim=5, codebook_size=16)
    x = torch.randn(4, 9, 5)
    mask = torch.rand(4, 9) > 0.4
    a, b = q(x, mask=mask), q(x[mask])
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.equal(a.indices[mask], b.indices) and torch.equal(a.quantized[mask], b.quantized)
    assert all(torch.equal(a.stats[k], b.stats[k]) for k in ("usage", "perplexity"))


@given(st.integers(1, 8), st.integers(1, 9), st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_eval_round_trip_and_purity(bits, dim, channel_first, seed):
    q = LFQ(dim=dim, codebook_size=2 ** bits, channel_first=channel_first).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    x = torch.randn(2, dim, 3, generator=torch.Generator().manual_seed(seed))
    if not channel_first:
        x = x.transpose(1, 2)
    out = q(x)
    assert out.indices.shape == (2, 3) and out.quantized.shape == x.shape
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert torch.equal(q.encode(x), out.indices)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_straight_through_gradient_is_identity_without_projection():
    q = LFQ(codebook_size=32, commitment_weight=0.0, entropy=dict(weight=0.0))
    assert q.identity_gradient and not LFQ(dim=7, codebook_size=32).identity_gradient
    x = torch.randn(10, 5, requires_grad=True)
    g = torch.randn(10, 5)
    (grad,) = torch.autograd.grad(q(x).quantized, x, g)
    assert torch.equal(grad, g)


def test_state_dict_round_trip_with_projection():
    a, b = LFQ(dim=12, codebook_size=64), LFQ(dim=12, codebook_size=64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(40, 12)
    assert torch.equal(a.encode(x), b.encode(x))


@pytest.mark.parametrize("size", [3, 12, 1000, 0, 1])
def test_codebook_size_not_a_power_of_two_raises(size):
    with pytest.raises(ValueError, match="codebook_size"):
        LFQ(codebook_size=size)


def test_bad_input_raises_and_leaves_state_unchanged():
    q = LFQ(dim=6, codebook_size=16)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    for bad in (torch.randn(3, 4), torch.tensor([[float("inf")] * 6])):
        with pytest.raises(ValueError, match="x"):
            q(bad)
    with pytest.raises(ValueError, match="indices"):
        q.decode(torch.tensor([-1]))
    with pytest.raises(ValueError, match="chunk_size"):
        codebook_entropy(torch.randn(3, 4), chunk_size=0)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_compiled_eval_forward_matches_eager():
    q = create_quantizer("lfq", dim=8, codebook_size=2 ** 10).eval()
    x = torch.randn(4, 16, 8)
    compiled = torch.compile(q, fullgraph=True, dynamic=False, backend="aot_eager")  # inductor: minutes on 2 cores
    eager, comp = q(x), compiled(x)
    assert torch.equal(comp.indices, eager.indices)
    torch.testing.assert_close(comp.quantized, eager.quantized)
    torch.testing.assert_close(comp.loss, eager.loss)

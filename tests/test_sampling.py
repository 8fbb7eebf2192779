"""The shared token sampler (inverse-CDF draws, rejection into the nucleus) against a float64 reference: the
filtered softmax of ``filter_logits``. Frequencies are checked with a 6-sigma bound, so a wrong distribution fails
and a right one passes except with negligible probability (fixed seeds make it deterministic anyway)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.generators import create_generator, make_generator
from quantkit.generators.sampling import filter_logits, sample_logits, sample_with_log_probs, top_p_filter


def reference_probs(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """float64 filtered softmax of one row of logits (V,) -> (V,)."""
    return filter_logits(logits.double()[None], temperature, top_k, top_p).double().softmax(-1)[0]


def assert_frequencies_match(ids: torch.Tensor, probs: torch.Tensor) -> None:
    n = ids.numel()
    counts = torch.bincount(ids, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "a filtered-out token was drawn"
    sigma = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 6 * sigma + 1).all(), (counts / n, probs)


SETTINGS = [dict(), dict(temperature=0.5), dict(temperature=2.0), dict(top_k=3), dict(top_p=0.6),
            dict(top_p=0.9, temperature=0.7), dict(top_k=5, top_p=0.8), dict(top_p=0.05)]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_draws_follow_the_filtered_distribution(kw):
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.0, -1.0, -3.0, 0.9])
    n = 60_000
    ids = sample_logits(logits.expand(n, -1), generator=make_generator(0), **kw)
    assert ids.shape == (n,) and ids.dtype == torch.int64
    assert_frequencies_match(ids, reference_probs(logits, **kw))


def test_returned_log_probs_are_the_unfiltered_tempered_log_softmax():
    logits = torch.randn(500, 40, generator=torch.Generator().manual_seed(1)) * 3
    ids, log_p = sample_with_log_probs(logits, temperature=0.7, top_k=10, top_p=0.8, generator=make_generator(2))
    expected = (logits.double() / 0.7).log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(log_p.double(), expected, atol=1e-5, rtol=1e-5)


def test_tokens_of_equal_probability_share_the_nucleus_fate():
    # the top token holds 0.4; the next two tie at 0.3 each: mass ahead of both is 0.4 < 0.5, so both stay
    logits = torch.tensor([0.4, 0.3, 0.3]).log()
    assert torch.isfinite(top_p_filter(logits, 0.5)).all()
    ids = sample_logits(logits.expand(30_000, -1), top_p=0.5, generator=make_generator(0))
    assert_frequencies_match(ids, reference_probs(logits, top_p=0.5))


def test_a_tiny_nucleus_of_a_flat_row_falls_back_to_direct_sampling():
    # p = 0.01 on 1,000 near-equal tokens keeps about ten: three rejection rounds leave ~97% of rows outside it
    logits = torch.linspace(0.0, 0.01, 1000)
    ref = reference_probs(logits, top_p=0.01)
    assert 5 <= int((ref > 0).sum()) <= 20
    ids = sample_logits(logits.expand(20_000, -1), top_p=0.01, generator=make_generator(0))
    assert_frequencies_match(ids, ref)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), vocab=st.integers(1, 50), top_k=st.one_of(st.none(), st.integers(1, 60)),
       top_p=st.one_of(st.none(), st.floats(0.01, 1.0)), temperature=st.floats(0.1, 5.0), seed=st.integers(0, 2**16),
       ties=st.booleans())
def test_draws_lie_in_the_kept_set_and_log_probs_are_finite(rows, vocab, top_k, top_p, temperature, seed, ties):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 4
    if ties:
        logits = logits.round()
    ids, log_p = sample_with_log_probs(logits, temperature, top_k, top_p, make_generator(seed))
    kept = torch.isfinite(filter_logits(logits, temperature, top_k, top_p))
    assert ids.shape == (rows,) and ((0 <= ids) & (ids < vocab)).all()
    assert kept.gather(-1, ids[:, None]).all()
    assert torch.isfinite(log_p).all() and (log_p <= 1e-6).all()


def test_the_same_seed_gives_the_same_tokens():
    logits = torch.randn(100, 30)
    a = sample_logits(logits, top_p=0.9, generator=make_generator(5))
    b = sample_logits(logits, top_p=0.9, generator=make_generator(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_logits_are_refused(bad):
    logits = torch.zeros(3, 5)
    logits[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        sample_logits(logits, generator=make_generator(0))


def test_maskgit_chunked_cpu_forward_gives_the_logits_of_one_call():
    model = create_generator("maskgit", vocab_size=16, token_shape=(4, 4), num_classes=3, dim=32, depth=2,
                             heads=2).eval()
    model.cpu_chunk = 3
    ids = torch.randint(0, 17, (10, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10) % 4
    with torch.no_grad():
        torch.testing.assert_close(model._logits_in_chunks(ids, labels), model(ids, labels), atol=1e-5, rtol=1e-5)


def test_tempered_log_probs_sum_to_one_over_the_vocabulary():
    # sanity of the reference itself: the filtered float64 distribution is a distribution
    p = reference_probs(torch.randn(20), temperature=0.8, top_k=7, top_p=0.7)
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-12) and int((p > 0).sum()) <= 7

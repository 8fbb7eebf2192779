"""RQ-Transformer soft labels and stochastic code sampling (quantkit/generators/rq_targets.py)."""
import pytest
import torch
import torch.nn.functional as F

from quantkit import create_quantizer
from quantkit.generators import create_generator
from quantkit.generators.rq_targets import (residual_codebooks, sample_residual_codes, soft_label_cross_entropy,
                                            soft_labels)


def _dense_reference(logits, targets, codebook, tau):
    e = codebook.double()
    d = ((e[targets][:, None, :] - e[None]) ** 2).sum(-1)  # (n, K), float64
    q = torch.softmax(-d / tau, dim=-1)
    return -(q * torch.log_softmax(logits.double(), -1)).sum(-1).mean(), q


@pytest.mark.parametrize("tau", [0.05, 0.5, 4.0])
def test_soft_labels_are_distributions_matching_the_formula(tau):
    g = torch.Generator().manual_seed(0)
    codebook, targets = torch.randn(24, 3, generator=g), torch.randint(24, (50,), generator=g)
    q = soft_labels(targets, codebook, tau)
    assert q.shape == (50, 24) and bool((q >= 0).all())
    torch.testing.assert_close(q.sum(-1), torch.ones(50), atol=1e-6, rtol=0)
    ref = _dense_reference(torch.zeros(50, 24), targets, codebook, tau)[1]
    torch.testing.assert_close(q.double(), ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(q.argmax(-1), targets)  # the target itself is the most probable code


def test_soft_labels_become_one_hot_as_tau_goes_to_zero():
    g = torch.Generator().manual_seed(1)
    codebook, targets = torch.randn(32, 4, generator=g), torch.randint(32, (64,), generator=g)
    logits = torch.randn(64, 32, generator=g)
    gaps = []
    for tau in (1.0, 0.1, 0.01, 1e-4):
        gaps.append(float((soft_labels(targets, codebook, tau) - F.one_hot(targets, 32)).abs().max()))
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-6
    torch.testing.assert_close(soft_label_cross_entropy(logits, targets, codebook, 1e-4),
                               F.cross_entropy(logits, targets), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 7, None])
def test_chunked_loss_and_gradient_match_the_dense_float64_reference(chunk_rows):
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(40, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(40, (30,), generator=g)
    logits = torch.randn(30, 40, generator=g, dtype=torch.float64, requires_grad=True)
    loss = soft_label_cross_entropy(logits, targets, codebook, 0.7, chunk_rows=chunk_rows)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_loss, _ = _dense_reference(logits, targets, codebook, 0.7)
    (ref_grad,) = torch.autograd.grad(ref_loss, logits)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=1e-5)


def test_no_gradient_reaches_the_codebook():
    codebook = torch.randn(8, 2, requires_grad=True)
    logits = torch.randn(5, 8, requires_grad=True)
    soft_label_cross_entropy(logits, torch.arange(5), codebook, 0.5).backward()
    assert codebook.grad is None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("bad, match", [
    (dict(targets=torch.tensor([0, 9])), r"\[0, 8\)"),
    (dict(logits=torch.randn(2, 7)), r"\(n, K\) = \(2, 8\)"),
    (dict(temperature=0.0), "temperature"),
    (dict(targets=torch.tensor([0.0, 1.0])), "int64"),
])
def test_bad_soft_label_input_is_refused(bad, match):
    args = dict(logits=torch.randn(2, 8), targets=torch.tensor([0, 1]), codebook=torch.randn(8, 3), temperature=0.5)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        soft_label_cross_entropy(**args)


def _rq_quantizer():
    torch.manual_seed(0)
    return create_quantizer("residual", dim=3, quantizer="vq", depth=3, codebook_size=16).eval()


def test_residual_codebooks_reproduce_decode():
    q = _rq_quantizer()
    books = residual_codebooks(q)
    assert books.shape == (3, 16, 3)
    ids = torch.randint(16, (20, 3))
    torch.testing.assert_close(sum(books[d][ids[:, d]] for d in range(3)), q.decode(ids))


def test_stochastic_codes_at_low_temperature_are_the_greedy_residual_codes():
    q = _rq_quantizer()
    books = residual_codebooks(q)
    ids = torch.randint(16, (200, 3), generator=torch.Generator().manual_seed(3))
    drawn = sample_residual_codes(ids, books, 1e-6, generator=torch.Generator().manual_seed(0), chunk_rows=37)
    greedy = q.encode(q.decode(ids))  # the quantizer's own greedy residual quantization of the reconstruction
    assert torch.equal(drawn, greedy)


def test_stochastic_codes_follow_the_softmax_over_distances():
    q = _rq_quantizer()
    books = residual_codebooks(q)[:1]  # one depth: the law is softmax(-||z - e_k||^2 / T)
    ids = torch.full((20000, 1), 5, dtype=torch.int64)
    T = 0.5
    drawn = sample_residual_codes(ids, books, T, generator=torch.Generator().manual_seed(4))[:, 0]
    freq = torch.bincount(drawn, minlength=16).double() / len(drawn)
    expected = torch.softmax(-((books[0][5] - books[0]) ** 2).sum(-1).double() / T, 0)
    assert float((freq - expected).abs().max()) < 0.015  # ~4 standard errors at 20,000 draws
    again = sample_residual_codes(ids, books, T, generator=torch.Generator().manual_seed(4))[:, 0]
    assert torch.equal(drawn, again)  # seeded: reproducible


def _model(**kw):
    torch.manual_seed(0)
    return create_generator("rq_transformer", vocab_size=16, token_shape=(2, 2, 3), num_classes=3, dim=32,
                            spatial_depth=1, depth_depth=1, heads=2, label_dropout=0.0, **kw)


def test_switches_off_give_the_hard_loss_and_tiny_tau_matches_it():
    q = _rq_quantizer()
    ids, labels = torch.randint(16, (4, 2, 2, 3)), torch.tensor([0, 1, 2, 0])
    plain = _model()
    hard = F.cross_entropy(plain(ids, labels).reshape(-1, 16), ids.reshape(-1))
    torch.testing.assert_close(plain.loss(ids, labels), hard)
    soft = _model(soft_label_temperature=1e-5)
    soft.set_codebooks(residual_codebooks(q))
    torch.testing.assert_close(soft.loss(ids, labels), hard, atol=1e-5, rtol=1e-5)
    warm = _model(soft_label_temperature=2.0)
    books = residual_codebooks(q)
    warm.set_codebooks(books)
    logits = warm(ids, labels).reshape(-1, 3, 16)
    flat = ids.reshape(-1, 3)
    ref = torch.stack([_dense_reference(logits[:, d], flat[:, d], books[d], 2.0)[0] for d in range(3)]).mean()
    torch.testing.assert_close(warm.loss(ids, labels).double(), ref, atol=1e-5, rtol=1e-5)
    assert float(ref) < float(hard) - 1e-3  # spread targets differ from one-hot ones


def test_stochastic_codes_change_the_training_inputs_only_in_training():
    q = _rq_quantizer()
    ids, labels = torch.randint(16, (8, 2, 2, 3)), torch.arange(8) % 3
    model = _model(code_temperature=5.0)
    model.set_codebooks(residual_codebooks(q))
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    torch.manual_seed(0)
    model.loss(ids, labels)
    model.eval()
    model.loss(ids, labels)
    handle.remove()
    assert not torch.equal(seen[0], ids) and torch.equal(seen[1], ids)
    assert not any("codebook" in k for k in model.state_dict())  # training-only state is never saved


def test_missing_or_malformed_codebooks_are_named():
    model = _model(soft_label_temperature=0.5)
    with pytest.raises(ValueError, match="codebook_source"):
        model.loss(torch.zeros(1, 2, 2, 3, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(depth, vocab, dim\) = \(3, 16, dim\)"):
        model.set_codebooks(torch.randn(2, 16, 3))
    with pytest.raises(ValueError, match="soft_label_temperature"):
        _model(soft_label_temperature=-1.0)

"""compat ``BinaryMapper`` against the peer's (a test dependency): under one seed the same samples, one-hot,
gradients and KL; deterministic mode and log_prob equal."""
import inspect

import pytest
import torch

import quantkit.compat.vector_quantize_pytorch as compat

peer = pytest.importorskip("vector_quantize_pytorch")


def _both(module_kwargs, logits, train, **call):
    outs = []
    for lib in (peer, compat):
        m = lib.BinaryMapper(**module_kwargs).train(train)
        x = logits.clone().requires_grad_()
        torch.manual_seed(3)
        out = m(x, **call)
        outs.append((m, x, out))
    return outs


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("call", [dict(), dict(temperature=0.5, return_indices=True),
                                  dict(deterministic=True, straight_through=True, calc_aux_loss=True,
                                       return_indices=True, reduce_aux_kl_loss=False)],
                         ids=["default", "tempered_indices", "deterministic_all_on"])
def test_binary_mapper_matches_peer_under_one_seed(train, call):
    logits = torch.randn(3, 5, 6) * 2
    (_, xp, out_p), (a, xa, out_a) = _both(dict(bits=6), logits, train, **call)
    assert len(out_p) == len(out_a)
    for u, v in zip(out_p, out_a):
        assert u.shape == v.shape and u.dtype == v.dtype
        torch.testing.assert_close(v, u, atol=1e-6, rtol=1e-5)
    if out_p[0].requires_grad:
        w = torch.randn(64, 4)  # a decoder embedding the one-hot
        ((out_p[0] @ w).square().sum() + out_p[-1].sum()).backward()
        ((out_a[0] @ w).square().sum() + out_a[-1].sum()).backward()
        torch.testing.assert_close(xa.grad, xp.grad, atol=1e-5, rtol=1e-4)
    assert out_a[0].requires_grad == out_p[0].requires_grad


def test_deterministic_on_eval_and_log_prob_match_peer():
    logits = torch.randn(10, 5)
    (p, _, out_p), (a, _, out_a) = _both(dict(bits=5, deterministic_on_eval=True, kl_loss_threshold=0.5), logits,
                                         False, return_indices=True)
    assert torch.equal(out_a[1], out_p[1]) and torch.equal(out_a[1], a.core.eval().encode(logits))
    torch.testing.assert_close(a.log_prob(logits, indices=out_a[1]), p.log_prob(logits, indices=out_p[1]))
    torch.testing.assert_close(a.log_prob(logits, one_hot=out_a[0], sum_bits=False),
                               p.log_prob(logits, one_hot=out_p[0], sum_bits=False))
    torch.testing.assert_close(a.calc_aux_loss(logits, reduce_aux_kl_loss=False),
                               p.calc_aux_loss(logits, reduce_aux_kl_loss=False))
    assert torch.equal(a.codes, p.codes)
    a.load_peer_state_dict(p.state_dict())


def test_signatures_are_the_peers():
    for name in ("__init__", "forward"):
        ours = inspect.signature(getattr(compat.BinaryMapper, name)).parameters
        theirs = inspect.signature(getattr(peer.BinaryMapper, name)).parameters
        assert list(ours) == list(theirs)
        assert all(ours[k].default == theirs[k].default for k in ours if k != "self")


def test_docs_table_is_the_parsed_table():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "compat_vector_quantize_pytorch.md").read_text()
    assert compat.keyword_table_markdown(compat.BinaryMapper.keywords) in text

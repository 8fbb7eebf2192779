"""compat ``FSP`` against the peer's (a test dependency), weights copied by ``load_peer_state_dict``: the same eval
outputs, indices, loss and info; under one seed the same training perturbation."""
import pytest
import torch

import quantkit.compat.vector_quantize_pytorch as compat

peer = pytest.importorskip("vector_quantize_pytorch")


def _pair(**kwargs):
    torch.manual_seed(0)
    p = peer.FSP(**kwargs)
    a = compat.FSP(**kwargs).load_peer_state_dict(p.state_dict())
    return p, a


CASES = [dict(levels=[8, 5, 5, 5]), dict(levels=[8, 5, 5, 5], dim=16, act_name="normal"),
         dict(levels=[4, 4, 3], act_name="sigmoid", need_inv_act=True, vector_norm="kurt"),
         dict(levels=[7, 5], act_name="laplace", quantize_rate=0.5, vector_norm="var_laplace"),
         dict(levels=[6, 3], dim=8, act_name="cauchy", need_inv_act=True, channel_first=True)]


@pytest.mark.parametrize("options", CASES, ids=["default", "projected_normal", "inverse_sigmoid_kurt",
                                                 "laplace_half_rate", "cauchy_inverse_channel_first"])
def test_fsp_matches_peer_in_eval_and_in_seeded_training(options):
    p, a = _pair(**options)
    dim = options.get("dim", len(options["levels"]))
    x = torch.randn(2, dim, 9, 7) if options.get("channel_first") else torch.randn(2, 300, dim)
    x = x * 1.5
    for train in (False, True):
        p.train(train), a.train(train)
        xp, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(1)
        q_p, i_p, loss_p, info_p = p(xp)
        torch.manual_seed(1)
        q_a, i_a, loss_a, info_a = a(xa)
        assert i_a.dtype == i_p.dtype == torch.int32 and torch.equal(i_a, i_p)
        torch.testing.assert_close(q_a, q_p, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss_a, loss_p, atol=1e-6, rtol=1e-5)
        assert torch.equal(info_a["level_indices"], info_p["level_indices"])
        for key in ("mean", "variance", "skewness", "kurtosis"):
            torch.testing.assert_close(info_a["norm_info"][key], info_p["norm_info"][key], atol=1e-5, rtol=1e-5)
        assert ("p_accept_prob" in info_a) == ("p_accept_prob" in info_p)
        if "p_accept_prob" in info_p:
            torch.testing.assert_close(info_a["p_accept_prob"], info_p["p_accept_prob"])
        if train:
            (q_p.square().sum() + loss_p).backward()
            (q_a.square().sum() + loss_a).backward()
            torch.testing.assert_close(xa.grad, xp.grad, atol=1e-4, rtol=1e-4)
        else:
            torch.testing.assert_close(a.indices_to_codes(i_a), p.indices_to_codes(i_p), atol=1e-5, rtol=1e-5)
            assert torch.equal(a.indices_to_level_indices(i_a), p.indices_to_level_indices(i_p))


def test_fsp_signature_and_refusals_are_the_peers():
    import inspect
    theirs = inspect.signature(peer.FSP.__init__).parameters
    ours = inspect.signature(compat.FSP.__init__).parameters
    assert list(ours) == list(theirs)
    assert all(ours[k].default == theirs[k].default for k in ours if k != "self")
    assert list(inspect.signature(compat.FSP.forward).parameters) == list(inspect.signature(peer.FSP.forward).parameters)
    with pytest.raises(compat.UnsupportedKeywordError, match="act_name"):
        compat.FSP([5, 5], act_name="gumbel")


def test_docs_table_is_the_parsed_table():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "compat_vector_quantize_pytorch.md").read_text()
    assert compat.keyword_table_markdown(compat.FSP.keywords) in text

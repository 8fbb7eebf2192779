"""ResidualVQ's per-level codebook sizes, beam search, freeze_codebook and quant_grad_frac (issue 17, part C)
against the peer (a test dependency), with the peer's weights copied by ``load_peer_state_dict``: the same eval
outputs, indices and losses, and the same codebooks after N EMA steps (the peer is deterministic given the input)."""
import pytest
import torch

import quantkit.compat.vector_quantize_pytorch as compat

peer = pytest.importorskip("vector_quantize_pytorch")

from test_compat_vqpytorch import _assert_same, _pair  # noqa: E402  (the side-by-side helpers)

SLOW = pytest.mark.slow
CASES = [pytest.param(dict(codebook_size=(32, 16, 8)), id="sizes"),
         pytest.param(dict(codebook_size=32, beam_size=4), id="beam", marks=SLOW),
         pytest.param(dict(codebook_size=(32, 16, 8), beam_size=3, eval_beam_size=5,
                           beam_score_quantizer_weights=[1.0, 2.0, 0.5]), id="beam_sizes_weights"),
         pytest.param(dict(codebook_size=32, beam_size=4, codebook_dim=4, use_cosine_sim=True),
                      id="beam_projection_cosine", marks=SLOW)]


@pytest.mark.parametrize("options", CASES)
def test_eval_outputs_indices_and_losses_match_peer(options):
    torch.manual_seed(0)
    p, a = _pair("ResidualVQ", dim=8, num_quantizers=3, **options)
    x, mask = torch.randn(2, 40, 8), torch.rand(2, 40) > 0.2
    for m in (None, mask):
        _assert_same(p(x, mask=m, return_all_codes=True), a(x, mask=m, return_all_codes=True), atol=1e-6)
    indices = a(x)[1]
    torch.testing.assert_close(a.get_output_from_indices(indices), p.get_output_from_indices(indices), atol=1e-6,
                               rtol=0)
    if isinstance(options["codebook_size"], tuple):
        assert isinstance(a.codebooks, tuple) and [c.shape[0] for c in a.codebooks] == [32, 16, 8]


def test_forward_beam_size_overrides_the_constructor_and_matches_peer():
    torch.manual_seed(0)
    p, a = _pair("ResidualVQ", dim=8, num_quantizers=3, codebook_size=32)
    x = torch.randn(2, 40, 8)
    _assert_same(p(x, beam_size=4), a(x, beam_size=4), atol=1e-6)
    assert a.rq.beam is None  # restored after the call


def test_codebooks_after_ema_training_match_peer():
    torch.manual_seed(0)
    p, a = _pair("ResidualVQ", dim=8, num_quantizers=3, codebook_size=(32, 16, 8))
    p.train(), a.train()
    for step in range(3):
        x = torch.randn(2, 100, 8) + 0.2 * step
        _, ip, _ = p(x)
        _, ia, _ = a(x)
        assert torch.equal(ia, ip)
    for ours, theirs in zip(a.codebooks, p.codebooks):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_beam_training_step_updates_every_level_where_the_peer_updates_only_the_first():
    torch.manual_seed(0)
    p, a = _pair("ResidualVQ", dim=8, num_quantizers=3, codebook_size=32, beam_size=4)
    start = a.codebooks.clone()
    p.train(), a.train()
    x = torch.randn(2, 100, 8)
    _, ip, _ = p(x)
    _, ia, _ = a(x)
    assert torch.equal(ia, ip)  # the same paths
    torch.testing.assert_close(a.codebooks[0], p.codebooks[0], atol=1e-5, rtol=1e-5)
    # The peer's update loop reads all_residuals[..., 0, :] (depth 0 of every beam) and stops after one level.
    assert torch.equal(p.codebooks[1:], start[1:]) and not torch.equal(a.codebooks[1:], start[1:])


def test_freeze_codebook_keeps_every_level_as_in_peer():
    torch.manual_seed(0)
    p, a = _pair("ResidualVQ", dim=8, num_quantizers=3, codebook_size=32)
    start = a.codebooks.clone()
    p.train(), a.train()
    x = torch.randn(2, 100, 8)
    _, ip, _ = p(x, freeze_codebook=True)
    _, ia, _ = a(x, freeze_codebook=True)
    assert torch.equal(ia, ip) and torch.equal(a.codebooks, start) and torch.equal(p.codebooks, start)
    # The constructor's freeze_codebook has no effect in the peer (forward passes False to every level): nor here.
    p2, a2 = _pair("ResidualVQ", dim=8, num_quantizers=2, codebook_size=32, freeze_codebook=True)
    before = a2.codebooks.clone()
    p2.train()(x), a2.train()(x)
    torch.testing.assert_close(a2.codebooks, p2.codebooks, atol=1e-5, rtol=1e-5)
    assert not torch.equal(a2.codebooks, before)


@pytest.mark.parametrize("frac", [0.3, pytest.param(1.0, marks=pytest.mark.slow)])
def test_quant_grad_frac_gradient_matches_peer(frac):
    torch.manual_seed(0)
    p, a = _pair("ResidualVQ", dim=8, num_quantizers=3, codebook_size=32, quant_grad_frac=frac, decay=1.0)
    p.train(), a.train()
    xp, xa = torch.randn(2, 50, 8, requires_grad=True), None
    xa = xp.detach().clone().requires_grad_()
    g = torch.randn(2, 50, 8)
    (p(xp)[0] * g).sum().backward()
    (a(xa)[0] * g).sum().backward()
    torch.testing.assert_close(xa.grad, xp.grad, atol=1e-5, rtol=1e-4)


def test_eval_beam_size_without_beam_size_is_refused_as_in_the_peer():
    with pytest.raises(compat.UnsupportedKeywordError, match="eval_beam_size"):
        compat.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, eval_beam_size=4)


# ----------------------------------------------------------------------------------------------------------------
# implicit_neural_codebook (QINCo)


@pytest.mark.parametrize("options", [pytest.param(dict(), id="default", marks=SLOW),
                                     pytest.param(dict(codebook_dim=4, codebook_size=(16, 8, 8),
                                                       mlp_kwargs=dict(dim_hidden=16, depth=2)), id="sizes_mlp")])
def test_qinco_matches_peer_in_eval(options):
    torch.manual_seed(0)
    options = {"codebook_size": 16, **options}
    p, a = _pair("ResidualVQ", dim=8, num_quantizers=3, implicit_neural_codebook=True, **options)
    x = torch.randn(2, 30, 8)
    _assert_same(p(x, return_all_codes=True), a(x, return_all_codes=True), atol=1e-6)
    indices = a(x)[1]
    torch.testing.assert_close(a.get_output_from_indices(indices), p.get_output_from_indices(indices), atol=1e-6,
                               rtol=0)


def test_qinco_training_gradients_of_codebooks_and_mlps_match_peer():
    torch.manual_seed(0)
    p, a = _pair("ResidualVQ", dim=8, num_quantizers=3, codebook_size=16, implicit_neural_codebook=True,
                 mlp_kwargs=dict(dim_hidden=16, depth=2))
    p.train(), a.train()
    x = torch.randn(2, 30, 8, requires_grad=True)
    out_p, out_a = p(x), a(x)
    assert torch.equal(out_a[1], out_p[1])
    out_p[2].sum().backward()
    out_a[2].sum().backward()  # quantkit's learnable-codebook loss has the peer's gradients (its value is twice)
    for d in range(3):
        torch.testing.assert_close(a.rq.layer(d).codebook.weight.grad, p.layers[d]._codebook.embed.grad[0])
    for ours, theirs in zip(a.rq.mlps.parameters(), p.mlps.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad)


# ----------------------------------------------------------------------------------------------------------------
# diveq


@pytest.mark.parametrize("options", [pytest.param(dict(), id="default", marks=SLOW),
                                     pytest.param(dict(codebook_dim=4), id="projection")])
def test_diveq_training_step_equals_peer_with_the_same_noise(options):
    torch.manual_seed(0)
    p, a = _pair("ResidualVQ", dim=8, num_quantizers=3, codebook_size=16, diveq=True, **options)
    x = torch.randn(2, 30, 8)
    assert torch.equal(a(x)[1], p(x)[1])  # eval: the same indices; quantkit's eval output is the codes, no noise
    torch.testing.assert_close(a(x)[0], a.get_output_from_indices(a(x)[1]))
    p.train(), a.train()
    xp, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 30, 8)
    torch.manual_seed(3)
    out_p = p(xp)
    torch.manual_seed(3)  # the direction noise comes from the global RNG, drawn in the same order on both sides
    out_a = a(xa)
    _assert_same([t.detach() for t in out_p], [t.detach() for t in out_a], atol=1e-6)
    (out_p[0] * g).sum().backward()
    (out_a[0] * g).sum().backward()
    torch.testing.assert_close(xa.grad, xp.grad, atol=1e-6, rtol=1e-5)
    for d in range(3):
        torch.testing.assert_close(a.rq.layer(d).codebook.weight.grad, p.layers[d]._codebook.embed.grad[0],
                                   atol=1e-6, rtol=1e-5)

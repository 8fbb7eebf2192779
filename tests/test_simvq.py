"""SimVQ (arXiv:2411.02038): quantkit's quantizer against a float64 reference and its invariants, and the
``SimVQ`` / ``ResidualSimVQ`` adapters against vector-quantize-pytorch with the peer's weights copied in."""
from pathlib import Path

import pytest
import torch
from _peer_signature import assert_peer_signature
from torch import nn

import quantkit.compat.vector_quantize_pytorch as compat
from quantkit import testing
from quantkit.compat.vector_quantize_pytorch import UnsupportedKeywordError, keyword_table_markdown
from quantkit.quantizers import ResidualQuantizer, SimVQ, list_quantizers

DOCS = Path(__file__).resolve().parents[1] / "docs" / "compat_vector_quantize_pytorch.md"


# ----------------------------------------------------------------------------------------------------------------
# quantkit's SimVQ


def test_simvq_is_registered_so_the_invariant_suite_covers_it():
    assert "simvq" in list_quantizers()


def test_indices_are_the_float64_nearest_rows_of_the_transformed_frozen_codebook():
    torch.manual_seed(0)
    q = SimVQ(16, 64, frozen_dim=8).eval()
    x = torch.randn(300, 16)
    codebook = q.frozen_codebook.double() @ q.codebook_transform.weight.double().T  # (K, dim) in float64
    expected = torch.cdist(x.double(), codebook).argmin(-1)
    out = q(x)
    assert torch.equal(out.indices, expected)
    torch.testing.assert_close(out.quantized, codebook[expected].float(), rtol=1e-6, atol=1e-6)


def test_loss_is_the_papers_two_terms_and_only_the_first_trains_the_transform():
    torch.manual_seed(0)
    q = SimVQ(8, 32, codebook_weight=1.0, commitment_weight=0.25, gradient="straight_through")
    x = torch.randn(40, 8, requires_grad=True)
    out = q(x)
    err = (x.detach() - out.quantized.detach()).square().mean()
    torch.testing.assert_close(out.loss, 1.25 * err)
    # d loss / d x is the commitment term's alone: 0.25 * 2 (x - q) / numel
    (grad_x,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    torch.testing.assert_close(grad_x, 0.25 * 2 * (x - out.quantized).detach() / x.numel())
    # the transform's gradient comes from the codebook term: the same with commitment_weight = 0
    out.loss.backward()
    g = q.codebook_transform.weight.grad.clone()
    q.zero_grad()
    q.commitment_weight = 0.0
    q(x).loss.backward()
    torch.testing.assert_close(q.codebook_transform.weight.grad, g)


@pytest.mark.parametrize("kwargs", [dict(gradient="straight_through", frozen_dim=4),
                                    dict(codebook_transform=nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                                                                          nn.Linear(16, 8)))],
                         ids=["straight_through", "mlp_transform"])
def test_check_quantizer_passes_on_simvq_variants(kwargs):
    torch.manual_seed(0)
    make = lambda: SimVQ(8, 16, **kwargs)  # noqa: E731 - the same module objects on every call: fine for loading
    testing.check_quantizer(make(), make=make)


def test_check_quantizer_passes_on_residual_simvq():
    torch.manual_seed(0)
    make = lambda: ResidualQuantizer(8, "simvq", depth=3, codebook_size=16, quantize_dropout=0.5)  # noqa: E731
    testing.check_quantizer(make(), make=make)


def test_bad_options_raise_naming_them():
    with pytest.raises(ValueError, match="frozen_dim"):
        SimVQ(8, 16, frozen_dim=0)
    with pytest.raises(ValueError, match="gradient"):
        SimVQ(8, 16, gradient="gumbel")
    with pytest.raises(ValueError, match="codebook_transform"):
        SimVQ(8, 16, codebook_transform=nn.Linear(8, 7))
    with pytest.raises(ValueError, match="frozen_init"):
        SimVQ(8, 16, frozen_init=lambda t: t[:3])
    with pytest.raises(ValueError, match="commitment_weight"):
        SimVQ(8, 16, commitment_weight=-1.0)


# ----------------------------------------------------------------------------------------------------------------
# the adapters against the peer

peer = pytest.importorskip("vector_quantize_pytorch")

# The peer passes even its eval output through the rotation formula: a few float32 ulps off the code.
ATOL = 1e-6


def _pair(name: str, **kwargs):
    torch.manual_seed(0)
    p = getattr(peer, name)(**kwargs)
    a = getattr(compat, name)(**kwargs).load_peer_state_dict(p.state_dict())
    return p, a


def _assert_same(theirs, ours):
    assert len(theirs) == len(ours)
    for u, v in zip(theirs, ours):
        assert u.shape == v.shape and u.dtype == v.dtype
        if u.is_floating_point():
            torch.testing.assert_close(v, u, atol=ATOL, rtol=1e-5)
        else:
            assert torch.equal(u, v)


SIMVQ_CASES = [dict(), dict(rotation_trick=False), dict(frozen_codebook_dim=16, commitment_weight=0.5,
                                                        input_to_quantize_commit_loss_weight=0.1),
               dict(channel_first=True)]


@pytest.mark.parametrize("options", SIMVQ_CASES, ids=lambda o: ",".join(o) or "default")
def test_simvq_matches_peer_in_eval(options):
    p, a = _pair("SimVQ", dim=32, codebook_size=64, **options)
    x = torch.randn(2, 32, 5, 6) if options.get("channel_first") else torch.randn(2, 50, 32)
    theirs, ours = p.eval()(x), a.eval()(x)
    _assert_same(theirs, ours)  # quantized, indices, loss (the peer computes it in eval too)
    torch.testing.assert_close(a.indices_to_codes(ours[1]), p.indices_to_codes(theirs[1]), atol=0, rtol=0)
    torch.testing.assert_close(a.codebook, p.codebook, atol=0, rtol=0)


def test_simvq_with_an_mlp_codebook_transform_matches_peer():
    """The README's MLP transform: the adapter gets its own module of that shape, load_peer_state_dict fills it."""
    def mlp():
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    torch.manual_seed(0)
    p = peer.SimVQ(dim=16, codebook_size=64, codebook_transform=mlp()).eval()
    a = compat.SimVQ(dim=16, codebook_size=64, codebook_transform=mlp()).load_peer_state_dict(p.state_dict()).eval()
    x = torch.randn(3, 40, 16)
    _assert_same(p(x), a(x))


@pytest.mark.parametrize("rotation_trick", [True, False])
def test_simvq_training_steps_match_peer(rotation_trick):
    """SimVQ is deterministic: SGD on (loss + a fixed function of the output) moves both transforms alike, and the
    input gradients (rotation trick or straight-through) agree."""
    p, a = _pair("SimVQ", dim=16, codebook_size=32, rotation_trick=rotation_trick)
    opt_p = torch.optim.SGD(p.parameters(), lr=0.5)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.5)
    target = torch.randn(4, 24, 16)
    for step in range(4):
        x = torch.randn(4, 24, 16)
        grads = []
        for module, opt in ((p, opt_p), (a, opt_a)):
            xr = x.clone().requires_grad_(True)
            quantized, indices, loss = module.train()(xr)
            ((quantized - target).square().mean() + loss).backward()
            opt.step()
            opt.zero_grad()
            grads.append((indices, loss.detach(), xr.grad))
        (i_p, l_p, g_p), (i_a, l_a, g_a) = grads
        assert torch.equal(i_p, i_a), f"step {step}"
        torch.testing.assert_close(l_a, l_p, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_a, g_p, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a.core.codebook_transform.weight, p.code_transform.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channel_first", [False, True])
def test_residual_simvq_matches_peer_in_eval(channel_first):
    p, a = _pair("ResidualSimVQ", dim=32, codebook_size=64, num_quantizers=3, channel_first=channel_first)
    x = torch.randn(2, 32, 5, 6) if channel_first else torch.randn(2, 50, 32)
    theirs, ours = p.eval()(x, return_all_codes=True), a.eval()(x, return_all_codes=True)
    _assert_same([theirs[i] for i in (0, 1, 3)], [ours[i] for i in (0, 1, 3)])
    # quantkit's residual stack sums the levels' losses: the per-level vector holds sum / Q
    torch.testing.assert_close(ours[2].sum(), theirs[2].sum(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.get_output_from_indices(ours[1]), p.get_output_from_indices(theirs[1]), atol=ATOL,
                               rtol=0)
    torch.testing.assert_close(a.codebooks, p.codebooks, atol=0, rtol=0)


def test_residual_simvq_dropout_keeps_a_prefix_and_decodes_coarse_indices():
    p, a = _pair("ResidualSimVQ", dim=16, codebook_size=32, num_quantizers=4, quantize_dropout=True,
                 quantize_dropout_cutoff_index=1)
    x = torch.randn(8, 64, 16)
    _, indices, _ = a.train()(x)
    kept = (indices >= 0).sum(-1)
    assert bool((kept >= 2).all()) and len(kept.unique()) > 1  # at least cutoff + 1 levels; prefixes vary per vector
    assert torch.equal(indices >= 0, torch.arange(4) < kept[..., None])  # -1 only after the kept prefix
    coarse = a.eval()(x)[1][..., :2]  # two levels, decoded as the peer does (missing levels are zero)
    torch.testing.assert_close(a.get_output_from_indices(coarse), p.eval().get_output_from_indices(coarse),
                               atol=ATOL, rtol=0)


def test_readme_examples_run():
    sim_vq = compat.SimVQ(dim=512, codebook_size=1024, rotation_trick=True)
    x = torch.randn(1, 32, 512)  # the README's 1024 tokens, cut to keep the test fast
    quantized, indices, commit_loss = sim_vq(x)
    assert x.shape == quantized.shape and torch.allclose(quantized, sim_vq.indices_to_codes(indices), atol=1e-6)
    residual_sim_vq = compat.ResidualSimVQ(dim=512, num_quantizers=4, codebook_size=1024, rotation_trick=True)
    quantized, indices, commit_loss = residual_sim_vq(x)
    assert x.shape == quantized.shape and indices.shape == (1, 32, 4) and commit_loss.shape == (4,)
    assert torch.allclose(quantized, residual_sim_vq.get_output_from_indices(indices), atol=1e-6)


def test_unsupported_values_raise_naming_the_keyword():
    with pytest.raises(UnsupportedKeywordError, match="heads"):
        compat.ResidualSimVQ(dim=8, codebook_size=16, num_quantizers=2, heads=2)
    with pytest.raises(UnsupportedKeywordError, match="quantize_dropout_multiple_of"):
        compat.ResidualSimVQ(dim=8, codebook_size=16, num_quantizers=2, quantize_dropout_multiple_of=2)
    with pytest.raises(UnsupportedKeywordError, match="rand_quantize_dropout_fixed_seed"):
        compat.ResidualSimVQ(dim=8, codebook_size=16, num_quantizers=2)(torch.randn(1, 4, 8),
                                                                        rand_quantize_dropout_fixed_seed=3)
    with pytest.raises(TypeError, match="codebook_sise"):
        compat.SimVQ(8, 16, codebook_sise=3)


@pytest.mark.parametrize("name", ["SimVQ", "ResidualSimVQ"])
def test_keywords_defaults_and_forward_are_the_peers(name):
    # ResidualSimVQ forwards SimVQ's keywords; init_fn's peer default is its own identity function
    also = (peer.SimVQ,) if name == "ResidualSimVQ" else ()
    assert_peer_signature(getattr(compat, name), getattr(peer, name), also=also, skip_default=("init_fn",))


def test_init_fn_is_applied_to_the_frozen_codebook():
    torch.manual_seed(0)
    a = compat.SimVQ(8, 16, init_fn=lambda t: t * 0 + 1.5)
    assert bool((a.frozen_codebook == 1.5).all())


@pytest.mark.parametrize("name", ["SimVQ", "ResidualSimVQ"])
def test_docs_hold_the_keyword_table(name):
    assert keyword_table_markdown(getattr(compat, name).keywords) in DOCS.read_text()

"""Latent quantization (arXiv:2305.18378): quantkit's quantizer against a float64 reference and closed forms, and
the ``LatentQuantize`` adapter against vector-quantize-pytorch with the peer's weights copied in."""
from pathlib import Path

import pytest
import torch
from _peer_signature import assert_peer_signature

import quantkit.compat.vector_quantize_pytorch as compat
from quantkit import testing
from quantkit.compat.vector_quantize_pytorch import UnsupportedKeywordError, keyword_table_markdown
from quantkit.quantizers import LatentQuantizer, list_quantizers
from quantkit.quantizers.latent_quantize import initial_values

DOCS = Path(__file__).resolve().parents[1] / "docs" / "compat_vector_quantize_pytorch.md"


def _reference_indices(q: LatentQuantizer, h: torch.Tensor) -> torch.Tensor:
    """float64 nearest value per channel, mixed radix with channel 0 least significant: (n, d) -> (n,)."""
    index, place = torch.zeros(h.shape[0], dtype=torch.int64), 1
    for i, values in enumerate(q.channel_values()):
        index += (h[:, i, None].double() - values.detach().double()).abs().argmin(-1) * place
        place *= len(values)
    return index


def test_latent_quantize_is_registered_so_the_invariant_suite_covers_it():
    assert "latent_quantize" in list_quantizers()


def test_initial_values_are_evenly_spread_with_zero_on_the_grid():
    assert initial_values(5).tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert initial_values(4).tolist() == [-0.5, -0.25, 0.0, 0.25]


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (6, 7, 3)])
def test_indices_are_the_float64_nearest_values_and_decode_returns_them(levels):
    torch.manual_seed(0)
    q = LatentQuantizer(levels)
    with torch.no_grad():  # trained-looking values: off the initial grid, unevenly spaced
        for v in q.channel_values():
            v.add_(0.05 * torch.randn_like(v))
    q.eval()
    x = 0.6 * torch.randn(500, len(levels))
    out = q(x)
    assert torch.equal(out.indices, _reference_indices(q, x))
    torch.testing.assert_close(q.decode(out.indices), out.quantized, rtol=0, atol=0)
    assert torch.equal(q.codes_to_indices(out.quantized), out.indices)


def test_loss_is_the_papers_and_only_the_quantization_term_trains_the_values():
    torch.manual_seed(0)
    q = LatentQuantizer((4, 5), quantization_weight=0.3, commitment_weight=0.1)
    x = torch.randn(64, 2, requires_grad=True)
    out = q(x)
    err = (x.detach() - out.quantized.detach()).square().mean()
    torch.testing.assert_close(out.loss, 0.4 * err)
    out.loss.backward()
    torch.testing.assert_close(x.grad, 0.1 * 2 * (x - out.quantized).detach() / x.numel())
    # d loss / d value = 0.3 * 2 * sum over the rows that chose it of (value - x) / numel
    digits = torch.stack([(x.detach()[:, i, None] - v.detach()).abs().argmin(-1) for i, v in
                          enumerate(q.channel_values())], -1)
    for i, v in enumerate(q.channel_values()):
        expected = torch.zeros_like(v).index_add_(0, digits[:, i], 0.3 * 2 * (out.quantized - x).detach()[:, i]
                                                  / x.numel())
        torch.testing.assert_close(v.grad, expected)


@pytest.mark.parametrize("kwargs", [dict(dim=8, heads=2), dict(dim=5, learnable_values=False)], ids=["heads", "fixed"])
def test_check_quantizer_passes_on_latent_quantize_variants(kwargs):
    torch.manual_seed(0)
    make = lambda: LatentQuantizer((4, 5, 3), **kwargs)  # noqa: E731
    testing.check_quantizer(make(), make=make)


def test_bad_options_raise_naming_them():
    with pytest.raises(ValueError, match="levels"):
        LatentQuantizer((4, 1))
    with pytest.raises(ValueError, match="heads"):
        LatentQuantizer((4, 5), heads=0)
    with pytest.raises(ValueError, match="quantization_weight"):
        LatentQuantizer((4, 5), quantization_weight=float("nan"))


# ----------------------------------------------------------------------------------------------------------------
# the adapter against the peer

peer = pytest.importorskip("vector_quantize_pytorch")

CASES = [([8, 5, 5, 5], dict(dim=4), (2, 4, 6, 5)), ([4, 5, 3], dict(dim=16), (2, 16, 30)),
         ([4, 5, 3], dict(dim=8, num_codebooks=2), (2, 8, 10)), (4, dict(dim=3, codebook_dim=3), (2, 3, 7)),
         ([8, 5, 5, 5], dict(dim=4, optimize_values=False), (9, 4)),
         ([4, 5, 3], dict(dim=3, keep_num_codebooks_dim=True), (2, 3, 5))]


def _pair(levels, **kwargs):
    torch.manual_seed(0)
    p = peer.LatentQuantize(levels=levels, **kwargs)
    a = compat.LatentQuantize(levels, **kwargs).load_peer_state_dict(p.state_dict())
    return p, a


@pytest.mark.parametrize("levels, options, shape", CASES, ids=["image", "projected", "codebooks", "int_levels",
                                                               "fixed_values_2d", "keep_codebook_axis"])
def test_latent_quantize_matches_peer(levels, options, shape):
    p, a = _pair(levels, **options)
    x = torch.randn(*shape)
    for train in (False, True):
        theirs, ours = p.train(train)(x), a.train(train)(x)
        for u, v in zip(theirs[:2], ours[:2]):
            assert u.shape == v.shape and u.dtype == v.dtype
            torch.testing.assert_close(v, u, rtol=0, atol=0)
        if not train or not a.has_projections:  # the peer measures its loss in the input space: see the docs
            torch.testing.assert_close(ours[2], theirs[2], rtol=1e-6, atol=0)
    if x.dim() > 2:  # the peer's indices_to_codes rearranges (b ... d) -> (b d ...)
        torch.testing.assert_close(a.indices_to_codes(ours[1]), p.indices_to_codes(theirs[1]), rtol=0, atol=1e-7)


def test_indices_are_right_where_the_peers_truncation_is_not():
    """With 6 and 7 levels the peer's float index arithmetic names a neighbouring code for some vectors; the
    adapter's outputs still equal the peer's and its indices decode to them."""
    p, a = _pair([6, 7], dim=2)
    x = torch.randn(4, 2, 100)
    (out_p, idx_p, _), (out_a, idx_a, _) = p.eval()(x), a.eval()(x)
    torch.testing.assert_close(out_a, out_p, rtol=0, atol=1e-7)  # the peer's z + (q - z).detach() rounds
    assert not torch.equal(idx_a, idx_p)
    torch.testing.assert_close(a.indices_to_codes(idx_a), out_a, rtol=0, atol=1e-7)
    assert torch.equal(idx_a.long().reshape(-1), _reference_indices(a.core, x.movedim(1, -1).reshape(-1, 2)))


def test_values_learn_in_quantkit_and_not_in_the_peer():
    """The peer's straight-through cuts the values' gradient; quantkit's quantization term trains them (the paper)."""
    p, a = _pair([4, 5], dim=2)
    x = torch.randn(4, 2, 50, requires_grad=True)
    p.train()(x)[2].backward()
    a.train()(x)[2].backward()
    assert all(v.grad is None or not bool(v.grad.any()) for v in p.values_per_latent)
    assert any(bool(v.grad.any()) for v in a.values_per_latent)


def test_readme_examples_run_including_the_sequences_the_peer_refuses():
    quantizer = compat.LatentQuantize(levels=[5, 5, 8], dim=16, commitment_loss_weight=0.1,
                                      quantization_loss_weight=0.1)
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, loss = quantizer(image_feats)
    assert (quantized.shape, indices.shape, loss.shape) == ((1, 16, 32, 32), (1, 32, 32), ())
    assert (quantized == quantizer.indices_to_codes(indices)).all()
    seq = torch.randn(1, 32, 16)  # the peer asserts here ("expected dimension of 16 but found dimension of 32")
    quantized, indices, _ = quantizer(seq)
    assert quantized.shape == (1, 32, 16) and indices.shape == (1, 32)
    torch.testing.assert_close(quantized, quantizer(seq.transpose(1, 2))[0].transpose(1, 2), rtol=0, atol=0)
    assert quantizer(torch.randn(1, 16, 10, 32, 32))[0].shape == (1, 16, 10, 32, 32)
    model = compat.LatentQuantize(levels=[4, 8, 16], dim=9, num_codebooks=3)
    output_tensor, indices, loss = model(torch.randn(2, 3, 9))
    assert output_tensor.shape == (2, 3, 9) and indices.shape == (2, 3, 3) and loss.item() >= 0


def test_layout_and_keywords_are_checked():
    a = compat.LatentQuantize([4, 5], 2)
    with pytest.raises(ValueError, match=r"\(B, 2, \.\.\.\)"):
        a(torch.randn(3, 7, 3))
    with pytest.raises(ValueError, match="codebook_dim"):
        compat.LatentQuantize([4, 5], 2, codebook_dim=3)
    with pytest.raises(UnsupportedKeywordError, match="in_place_codebook_optimizer"):
        compat.LatentQuantize([4, 5], 2, in_place_codebook_optimizer=torch.optim.SGD)


def test_keywords_defaults_and_forward_are_the_peers():
    assert_peer_signature(compat.LatentQuantize, peer.LatentQuantize)
    assert keyword_table_markdown(compat.LatentQuantize.keywords) in DOCS.read_text()

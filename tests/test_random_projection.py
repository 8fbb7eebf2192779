"""BEST-RQ's random-projection quantizer (arXiv:2202.01855): quantkit's quantizer against a float64 reference and
closed forms, and the ``RandomProjectionQuantizer`` adapter against vector-quantize-pytorch with the peer's
buffers copied in."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _peer_signature import assert_peer_signature

import quantkit.compat.vector_quantize_pytorch as compat
from quantkit import testing
from quantkit.compat.vector_quantize_pytorch import UnsupportedKeywordError, keyword_table_markdown
from quantkit.quantizers import RandomProjectionQuantizer, list_quantizers

DOCS = Path(__file__).resolve().parents[1] / "docs" / "compat_vector_quantize_pytorch.md"


def test_random_projection_is_registered_so_the_invariant_suite_covers_it():
    assert "random_projection" in list_quantizers()


@pytest.mark.parametrize("normalize", [True, False])
def test_indices_are_the_float64_cosine_nearest_codes_of_the_projected_input(normalize):
    q = RandomProjectionQuantizer(32, 64, 8, heads=2, normalize=normalize, seed=3).eval()
    x = 3 * torch.randn(400, 32) + 1
    z = x.double()
    if normalize:
        z = (z - z.mean(-1, keepdim=True)) / (z.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    for h in range(2):
        p = F.normalize(z @ q.projection[h].double(), dim=-1)
        expected = (p @ q.codebook[h].double().T).argmax(-1)
        assert torch.equal(q(x).indices[:, h], expected)


def test_quantized_is_the_least_norm_vector_projecting_onto_the_chosen_codes():
    q = RandomProjectionQuantizer(32, 64, 8, heads=2, normalize=False, projection_bias=True, seed=0).eval()
    with torch.no_grad():
        q.projection_bias.normal_()
    out = q(torch.randn(50, 32))
    chosen = torch.stack([q.codebook[h][out.indices[:, h]] for h in range(2)], dim=1)  # (50, 2, 8)
    torch.testing.assert_close(q.project(out.quantized), chosen, rtol=1e-4, atol=1e-5)
    # least norm: quantized lies in the row space of the projection (orthogonal to its null space)
    matrix = q.projection.permute(1, 0, 2).reshape(32, -1).double()
    null = torch.linalg.svd(matrix.T).Vh[16:]  # (16, 32): the directions the projection ignores
    assert float((out.quantized.double() @ null.T).abs().max()) < 1e-4
    assert float(out.loss) == 0.0


def test_seed_fixes_the_buffers_and_nothing_is_a_parameter():
    a, b = (RandomProjectionQuantizer(16, 32, 4, seed=7) for _ in range(2))
    assert torch.equal(a.projection, b.projection) and torch.equal(a.codebook, b.codebook)
    assert list(a.parameters()) == []
    torch.testing.assert_close(a.codebook.norm(dim=-1), torch.ones(1, 32))


@pytest.mark.parametrize("kwargs", [dict(heads=3, projection_bias=True), dict(normalize=False)],
                         ids=["heads_bias", "no_norm"])
def test_check_quantizer_passes_on_random_projection_variants(kwargs):
    make = lambda: RandomProjectionQuantizer(8, 16, 4, seed=0, **kwargs)  # noqa: E731
    testing.check_quantizer(make(), make=make)


def test_bad_options_raise_naming_them():
    with pytest.raises(ValueError, match="codebook_dim"):
        RandomProjectionQuantizer(8, 16, 0)
    with pytest.raises(ValueError, match="heads"):
        RandomProjectionQuantizer(8, 16, 4, heads=True)


# ----------------------------------------------------------------------------------------------------------------
# the adapter against the peer

peer = pytest.importorskip("vector_quantize_pytorch")


@pytest.mark.parametrize("options", [dict(), dict(num_codebooks=3), dict(norm=False)],
                         ids=lambda o: ",".join(o) or "default")
def test_random_projection_quantizer_matches_peer(options):
    torch.manual_seed(0)
    p = peer.RandomProjectionQuantizer(dim=64, codebook_size=128, codebook_dim=16, **options)
    a = compat.RandomProjectionQuantizer(dim=64, codebook_size=128, codebook_dim=16, **options)
    a.load_peer_state_dict(p.state_dict())
    x = torch.randn(2, 300, 64)
    theirs, ours = p(x), a(x)
    assert theirs.shape == ours.shape and theirs.dtype == ours.dtype
    assert torch.equal(theirs, ours)
    targets = theirs.clone()
    targets[0, :10] = -1  # ignored, as in the peer
    torch.testing.assert_close(a(x, indices=targets), p(x, indices=targets), rtol=1e-5, atol=1e-6)


def test_readme_example_runs():
    # The README's codebook_dim=256 with 16 codebooks means 16 x 1024 codes of 16 x 256 channels (the peer's inner
    # projection widens each head), 10 s to draw on a CPU: 32 channels and 16 tokens keep every shape rule.
    quantizer = compat.RandomProjectionQuantizer(dim=512, num_codebooks=16, codebook_dim=32, codebook_size=1024)
    indices = quantizer(torch.randn(1, 16, 512))
    assert indices.shape == (1, 16, 16) and indices.dtype == torch.int64


def test_keywords_defaults_and_forward_are_the_peers():
    assert_peer_signature(compat.RandomProjectionQuantizer, peer.RandomProjectionQuantizer)
    assert keyword_table_markdown(compat.RandomProjectionQuantizer.keywords) in DOCS.read_text()


def test_vector_quantize_keywords_and_bad_layouts_are_refused_by_name():
    with pytest.raises(UnsupportedKeywordError, match="kmeans_init"):
        compat.RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4, kmeans_init=True)
    with pytest.raises(ValueError, match=r"\(b, n, 8\)"):
        compat.RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4)(torch.randn(3, 8))

"""VQGANLCQuantizer (quantkit/quantizers/vqgan_lc.py): a frozen k-means feature codebook, a trained projector."""
import time

import faiss
import pytest
import torch

from quantkit import VQGANLCQuantizer, create_quantizer
from quantkit.quantizers.codebook import faiss_kmeans
from quantkit.testing import check_quantizer


def test_check_quantizer_contract():
    check_quantizer(create_quantizer("vqgan_lc", dim=8, codebook_size=64, feature_dim=16))


def test_from_features_codebook_is_the_faiss_centroids():
    features = torch.randn(500, 12)
    q = VQGANLCQuantizer.from_features(features, 32, 4, niter=6, seed=5)
    km = faiss.Kmeans(12, 32, niter=6, seed=5, max_points_per_centroid=16, min_points_per_centroid=1,
                      verbose=False)
    km.train(features.numpy())
    torch.testing.assert_close(q.features_codebook, torch.from_numpy(km.centroids))


def test_only_the_projector_is_trained():
    q = VQGANLCQuantizer.from_features(torch.randn(300, 12), 32, 4)
    assert {n for n, p in q.named_parameters() if p.requires_grad} == {"projector.weight", "projector.bias"}
    frozen = q.features_codebook.clone()
    x = torch.randn(40, 4, requires_grad=True)
    out = q(x)
    out.loss.backward()
    assert q.projector.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    opt.step()
    assert torch.equal(q.features_codebook, frozen)


def test_search_uses_the_projected_codebook():
    q = VQGANLCQuantizer.from_features(torch.randn(300, 12), 32, 4).eval()
    x = torch.randn(50, 4)
    out = q(x)
    projected = q.projector(q.features_codebook).detach().double()  # (K, dim)
    d = torch.cdist(x.double(), projected)
    chosen = d.gather(1, out.indices[:, None])[:, 0]
    assert bool((chosen <= d.min(1).values + 1e-5).all())
    assert torch.equal(q.decode(out.indices), out.quantized)


def test_tree_kmeans_gives_distinct_centroids_of_every_group():
    x = torch.randn(3000, 8)
    c = faiss_kmeans(x, 1000, niter=3, max_points_per_centroid=4, max_flat_codes=64, branching=8)
    assert c.shape == (1000, 8) and torch.unique(c, dim=0).shape[0] == 1000
    # every centroid is near data (it is a mean of data points of its own cluster)
    assert torch.cdist(c, x).min(1).values.max() < torch.cdist(x[:200], x[200:]).min(1).values.max() * 3


@pytest.mark.parametrize("bad, argument", [
    (dict(features=torch.randn(10, 4), codebook_size=20), "features"),
    (dict(features=torch.full((40, 4), float("nan")), codebook_size=20), "NaN"),
    (dict(features=torch.randn(40, 4), codebook_size=0), "codebook_size"),
])
def test_bad_from_features_raises_naming_the_argument(bad, argument):
    with pytest.raises(ValueError, match=argument):
        VQGANLCQuantizer.from_features(dim=4, **bad)


@pytest.mark.slow
def test_100k_code_codebook_from_features():
    torch.manual_seed(0)
    centers = torch.randn(2000, 32) * 4  # clustered, like real image features
    features = centers.repeat_interleave(60, 0) + torch.randn(120_000, 32)
    start = time.perf_counter()
    q = VQGANLCQuantizer.from_features(features, 100_000, 8, niter=5)
    assert time.perf_counter() - start < 60
    assert q.features_codebook.shape == (100_000, 32)
    out = q(torch.randn(256, 8))
    assert out.indices.max() < 100_000 and out.loss.isfinite()

"""VQGANLCQuantizer (quantkit/quantizers/vqgan_lc.py): a frozen k-means feature codebook, a trained projector."""
import time

import faiss
import pytest
import torch

from quantkit import VQGANLCQuantizer, create_quantizer
from quantkit.quantizers.codebook import faiss_kmeans
from quantkit.testing import check_quantizer, utilization_after_training


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


def _lc_utilization(init_from_data: bool) -> float:
    torch.manual_seed(0)
    q = VQGANLCQuantizer(8, 256, 16, init_from_data=init_from_data)
    z = 8.0 + torch.randn(2048, 8)  # latents whose centre and spread a random projector knows nothing of
    return utilization_after_training(q, z, torch.optim.SGD(q.parameters(), lr=0.1), steps=3)


def test_projector_fitted_to_the_latents_keeps_the_projected_codebook_in_use():
    # a random projector puts E' far from (or much smaller than) the latents: one code wins every row (the collapse)
    assert _lc_utilization(init_from_data=False) < 0.1
    assert _lc_utilization(init_from_data=True) > 0.5


def test_projector_init_matches_latent_statistics_once_and_not_in_eval():
    torch.manual_seed(1)
    q = VQGANLCQuantizer(8, 128, 16)
    z = -2.0 + 0.5 * torch.randn(512, 8)
    q.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(z)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # eval changes nothing
    q.train()
    q(z)
    e = q.projected_codebook().detach()
    torch.testing.assert_close(e.mean(0), z.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(e.std(0), z.std(0), atol=1e-4, rtol=1e-4)
    weight = q.projector.weight.detach().clone()
    q(3.0 * z)  # only the first training batch initializes
    assert torch.equal(weight, q.projector.weight)
    # checkpoints without the flag load as initialized
    state = {k: v for k, v in q.state_dict().items() if k != "initialized"}
    fresh = VQGANLCQuantizer(8, 128, 16)
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)

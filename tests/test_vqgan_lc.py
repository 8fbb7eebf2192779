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


class _Patches(torch.nn.Module):
    """A toy patch feature encoder: (B, 1, 8, 8) -> (B, 4, 16), the four 4x4 quadrants, plus a learned offset."""

    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.zeros(16))

    def forward(self, x):
        b = x.shape[0]
        return x.reshape(b, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(b, 4, 16) + self.offset


def _images(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(1, 8, 8, generator=g), 0) for _ in range(n)]


def test_codebook_from_an_encoder_reproduces_with_a_seed():
    data = _images()
    a = VQGANLCQuantizer.from_encoder(_Patches(), data, 32, 4, seed=3, niter=4, progress=False)
    b = VQGANLCQuantizer.from_encoder(_Patches(), data, 32, 4, seed=3, niter=4, progress=False)
    c = VQGANLCQuantizer.from_encoder(_Patches(), data, 32, 4, seed=4, niter=4, progress=False)
    assert a.features_codebook.shape == (32, 16)
    assert torch.equal(a.features_codebook, b.features_codebook)
    assert not torch.equal(a.features_codebook, c.features_codebook)


def test_encoder_features_are_sampled_from_the_dataset_patches():
    from quantkit.quantizers.vqgan_lc import sample_patch_features

    data = _images(50)
    feats = sample_patch_features(_Patches(), data, 90, progress=False)
    assert feats.shape == (90, 16)
    every = _Patches()(torch.stack([x for x, _ in data])).detach().reshape(-1, 16)  # (200, 16): all the patches
    d = torch.cdist(feats, every).min(1).values
    assert float(d.max()) < 1e-2  # every sampled feature is one of the dataset's patch features (cdist rounding)
    assert torch.unique(feats, dim=0).shape[0] == 90  # no patch twice
    assert sample_patch_features(_Patches(), data, 10_000, progress=False).shape == (200, 16)  # capped at all


def test_encoder_with_the_wrong_output_shape_is_refused_naming_the_expected_shape():
    class Pooled(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)  # (B, 64): no patch axis

    with pytest.raises(ValueError, match=r"\(B, N, F\) = \(2, N, F\) for images of shape \(2, 1, 8, 8\)"):
        VQGANLCQuantizer.from_encoder(Pooled(), _images(), 16, 4, progress=False)


def test_too_few_patch_features_for_the_codebook_is_refused():
    with pytest.raises(ValueError, match=r"10 images x 4 patches = 40 features, fewer than the 64 codes"):
        VQGANLCQuantizer.from_encoder(_Patches(), _images(10), 64, 4, progress=False)


def test_saved_codebook_builds_the_same_quantizer_from_its_path(tmp_path):
    q = VQGANLCQuantizer.from_features(torch.randn(200, 6), 16, 4, niter=3)
    path = q.save_codebook(tmp_path / "codebook.safetensors")
    again = create_quantizer("vqgan_lc", dim=4, codebook_size=16, features_codebook=str(path))
    assert torch.equal(again.features_codebook, q.features_codebook)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VQGANLCQuantizer(4, 16, features_codebook=str(tmp_path / "missing.safetensors"))

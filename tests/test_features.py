"""quantkit.features: the MAE (masking, visible-only encoder, masked-patch loss), the feature encoder interface,
the linear probe and the features run folder."""
import pytest
import torch
from torch import nn

from quantkit.features import (MAE, FeatureEncoder, MAETrainConfig, as_feature_encoder, linear_probe,
                               load_feature_encoder, load_mae, train_mae)


@pytest.mark.parametrize("image_size, patch, ratio", [(16, 4, 0.75), (16, 2, 0.75), (12, 4, 0.5), (16, 4, 0.9)])
def test_mask_covers_exactly_the_requested_ratio(image_size, patch, ratio):
    mae = MAE(image_size=image_size, patch_size=patch, mask_ratio=ratio)
    n = (image_size // patch) ** 2
    ids_keep, mask = mae.random_masking(64, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (64, n) and ids_keep.shape == (64, n - round(n * ratio))
    assert bool((mask.sum(1) == round(n * ratio)).all())
    # the visible indices are exactly the unmasked patches, each once
    visible = torch.zeros_like(mask).scatter_(1, ids_keep, True)
    assert torch.equal(visible, ~mask) and bool((ids_keep.sort(1).values.diff(1) > 0).all())
    # different images get different masks
    assert torch.unique(mask, dim=0).shape[0] > 1


def test_encoder_never_sees_a_masked_patch():
    torch.manual_seed(0)
    mae = MAE(image_size=16, patch_size=4, width=32, depth=2, heads=2)
    images = torch.rand(6, 1, 16, 16)
    ids_keep, mask = mae.random_masking(6, generator=torch.Generator().manual_seed(1))
    seen = []
    handle = mae.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    latent = mae.encode_visible(images, ids_keep)
    handle.remove()
    assert seen == [torch.Size([6, mae.num_visible, 32])]  # the encoder's input is the visible patches only
    # any change of the masked patches' pixels leaves the encoder's output bit for bit unchanged ...
    pixel_mask = mae.unpatchify(mask[..., None].expand(-1, -1, mae.patch_dim).float()).bool()  # (B, 1, H, W)
    scrambled = torch.where(pixel_mask, torch.rand_like(images) * 5, images)
    assert torch.equal(mae.encode_visible(scrambled, ids_keep), latent)
    # ... and its gradient with respect to those pixels is exactly zero, while the visible pixels get one
    x = images.clone().requires_grad_(True)
    mae.encode_visible(x, ids_keep).square().sum().backward()
    assert bool((x.grad[pixel_mask] == 0).all()) and x.grad[~pixel_mask].abs().sum() > 0


def test_loss_is_the_mse_on_masked_patches_against_normalized_pixels():
    torch.manual_seed(2)
    mae = MAE(image_size=8, patch_size=2, width=16, depth=1, heads=2, decoder_width=16, decoder_heads=2).double()
    images = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    out = mae(images, generator=torch.Generator().manual_seed(3))
    patches = mae.patchify(images)  # (B, N, 4), float64 reference
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = ((out.pred - target) ** 2).mean(-1)[out.mask].mean()
    torch.testing.assert_close(out.loss, expected)
    # normalized targets: zero mean, unit (unbiased) variance per patch
    torch.testing.assert_close(mae.targets(images).mean(-1), torch.zeros(3, 16, dtype=torch.float64), atol=1e-12,
                               rtol=0)
    # the visible patches' predictions get no gradient from the loss
    pred = out.pred.detach().requires_grad_(True)
    ((pred - target) ** 2).mean(-1).mul(out.mask).sum().div(out.mask.sum()).backward()
    assert bool((pred.grad[~out.mask] == 0).all()) and pred.grad[out.mask].abs().sum() > 0


def test_mae_trains_and_its_features_have_the_interface_shape():
    torch.manual_seed(0)
    mae = MAE(image_size=8, patch_size=2, width=16, depth=1, heads=2, decoder_width=16, decoder_heads=2)
    images = torch.rand(16, 1, 8, 8).round()  # binary blobs: learnable structure
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(40):
        loss = mae(images, generator=g).loss
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first
    enc = as_feature_encoder(mae, (1, 8, 8))
    assert (enc.num_patches, enc.feature_dim) == (16, 16) and enc(images).shape == (16, 16, 16)


@pytest.mark.parametrize("output, expected", [
    (lambda x: x.flatten(1), r"\(B, N, F\) = \(2, N, F\) for images of shape \(2, 1, 8, 8\).*\(2, 64\)"),
    (lambda x: (x, x), r"\(B, N, F\) = \(2, N, F\).*tuple"),
    (lambda x: x.flatten(2).long(), r"\(B, N, F\) = \(2, N, F\)"),
])
def test_wrong_output_shape_is_refused_naming_the_expected_shape(output, expected):
    class Bad(nn.Module):
        def forward(self, x):
            return output(x)

    with pytest.raises(ValueError, match=expected):
        FeatureEncoder(Bad(), (1, 8, 8))


def test_declared_patches_and_feature_size_are_enforced():
    class Flat(nn.Module):
        def forward(self, x):  # (B, 1, 8, 8) -> (B, 8, 8): 8 patches of 8 features
            return x[:, 0]

    assert FeatureEncoder(Flat(), (1, 8, 8), num_patches=8, feature_dim=8).num_patches == 8
    with pytest.raises(ValueError, match=r"\(B, N, F\) = \(2, 16, 8\).*got \(2, 8, 8\)"):
        FeatureEncoder(Flat(), (1, 8, 8), num_patches=16, feature_dim=8)
    enc = FeatureEncoder(Flat(), (1, 8, 8))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, 8, 8\)"):
        enc(torch.rand(2, 3, 8, 8))


def test_user_encoder_is_frozen():
    lin = nn.Linear(4, 5)
    enc = FeatureEncoder(nn.Sequential(nn.Flatten(1, 2), lin), (1, 4, 4))  # -> (B, 4, 5)
    x = torch.rand(3, 1, 4, 4, requires_grad=True)
    y = enc(x)
    assert y.shape == (3, 4, 5) and not y.requires_grad
    assert not lin.training


def test_linear_probe_separates_separable_data_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 5, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 5).float()
    assert linear_probe(x[:200], y[:200], x[200:], y[200:])["accuracy"] == 1.0
    noise = torch.randn(300, 5, generator=g)
    assert linear_probe(noise[:200], y[:200], noise[200:], y[200:])["accuracy"] < 0.6


def test_features_run_is_cached_and_loads(tmp_path):
    config = MAETrainConfig(steps=3, batch_size=8, warmup_steps=1, out_dir=str(tmp_path / "mae"), progress=False,
                            model_config=dict(width=16, depth=1, heads=2, decoder_width=16, decoder_heads=2))
    first = train_mae(config)
    assert not first.cached and len(first.losses) == 1
    again = train_mae(config)
    assert again.cached and again.losses == first.losses
    with pytest.raises(FileExistsError, match="different features run"):
        train_mae(MAETrainConfig(**{**config.to_dict(), "steps": 4}))
    mae = load_mae(tmp_path / "mae")
    enc = load_feature_encoder(tmp_path / "mae")
    images = torch.rand(2, 1, 16, 16)
    assert torch.equal(enc(images), mae.features(images))
    with pytest.raises(FileNotFoundError, match="not a quantkit features run"):
        load_mae(tmp_path / "nothing")

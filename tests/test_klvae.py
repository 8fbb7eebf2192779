"""KL-VAE: the KL against its closed form, the log-variance clamp, the reparameterised sample's moments, the
continuous encode / decode contract, the latent scale factor, the collapse statistics and warning, bad input."""
import math
import warnings

import pytest
import torch

from quantkit.tokenizers import KLVAE, create_tokenizer, list_tokenizers, tokenizer_class
from quantkit.tokenizers.klvae import active_units, kl_to_standard_normal

TINY = dict(image_size=8, channels=1, ch=8, ch_mult=(1, 2), z_channels=8, embed_dim=3, norm_groups=4)


def tiny(**kw):
    return create_tokenizer("klvae", **{**TINY, **kw})


def test_klvae_is_registered_as_the_continuous_tokenizer():
    assert "klvae" in list_tokenizers() and tokenizer_class("klvae").continuous
    assert not tokenizer_class("vqgan").continuous
    tok = tiny()
    assert isinstance(tok, KLVAE) and tok.latent_shape == (4, 4, 3)


def test_kl_matches_the_closed_form_and_torch_distributions_in_float64():
    mean = torch.randn(50, dtype=torch.float64)
    logvar = torch.randn(50, dtype=torch.float64)
    ours = kl_to_standard_normal(mean, logvar)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(ours, ref)
    zero = kl_to_standard_normal(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(zero, torch.zeros(3, dtype=torch.float64))
    assert math.isclose(float(kl_to_standard_normal(torch.tensor(2.0), torch.tensor(0.0))), 2.0)


def test_weighted_kl_term_is_kl_weight_times_the_per_image_sum_over_pixels():
    tok = tiny(kl_weight=0.5).eval()
    images = tok.from_unit(torch.rand(4, 1, 8, 8))
    _, loss, stats = tok.encode_posterior(images)
    mean, logvar = tok.posterior(images)
    expected = 0.5 * kl_to_standard_normal(mean, logvar).flatten(1).sum(1).mean() / 64
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["kl_per_dim"], kl_to_standard_normal(mean, logvar).mean())


def test_logvar_clamp_keeps_the_posterior_finite_at_plus_minus_100():
    for bias in (100.0, -100.0):
        tok = tiny().train()
        with torch.no_grad():
            tok.quant_conv.weight.zero_()
            tok.quant_conv.bias.fill_(bias)
        with torch.no_grad():
            z, loss, _ = tok.encode_posterior(tok.from_unit(torch.rand(2, 1, 8, 8)))
            _, logvar = tok.posterior(tok.from_unit(torch.rand(2, 1, 8, 8)))
        assert float(logvar.max()) <= 20.0 and float(logvar.min()) >= -30.0
        assert torch.isfinite(z).all() and torch.isfinite(loss)


def test_training_sample_has_the_posterior_moments_and_eval_uses_the_mean():
    tok = tiny().train()
    image = tok.from_unit(torch.rand(1, 1, 8, 8)).expand(4000, -1, -1, -1)
    with torch.no_grad():
        mean, logvar = tok.posterior(image[:1])
        z, _, _ = tok.encode_posterior(image)
    torch.testing.assert_close(z.mean(0), mean[0], atol=0.1, rtol=0)
    torch.testing.assert_close(z.var(0), logvar[0].exp(), atol=0.1, rtol=0.1)
    tok.eval()
    with torch.no_grad():
        z_eval, _, _ = tok.encode_posterior(image[:2])
    torch.testing.assert_close(z_eval, mean.expand(2, -1, -1, -1))


def test_encode_decode_follow_the_continuous_contract():
    tok = tiny().eval()
    images = tok.from_unit(torch.rand(3, 1, 8, 8))
    latents = tok.encode(images)
    assert latents.dtype == torch.float32 and tuple(latents.shape) == (3, *tok.latent_shape)
    assert torch.equal(tok.encode(images), latents)  # the mode: deterministic
    out = tok.decode(latents)
    lo, hi = tok.pixel_range
    assert out.shape == images.shape and out.dtype == torch.float32 and out.min() >= lo and out.max() <= hi
    torch.testing.assert_close(out, tok(images).reconstruction.clamp(lo, hi), atol=1e-5, rtol=1e-5)


def test_latent_scale_gives_unit_std_on_the_set_it_was_measured_on_and_decode_undoes_it():
    tok = tiny().eval()
    batches = [torch.rand(16, 1, 8, 8) for _ in range(3)]
    raw = torch.cat([tok.encode(tok.from_unit(b)) for b in batches])  # scale 1 so far
    s = tok.measure_latent_scale(batches)
    assert math.isclose(s, 1 / float(raw.double().std()), rel_tol=1e-5)
    scaled = torch.cat([tok.encode(tok.from_unit(b)) for b in batches])
    assert math.isclose(float(scaled.std()), 1.0, rel_tol=1e-4)
    torch.testing.assert_close(tok.decode(scaled[:4]), tok.decode_latents(raw[:4]).clamp(-1, 1), atol=1e-5,
                               rtol=1e-5)
    assert "latent_scale" in tok.state_dict()


def test_training_loss_has_recon_and_kl_and_reaches_every_parameter():
    tok = tiny(kl_weight=1e-3).train()
    terms, out = tok.training_loss(tok.from_unit(torch.rand(2, 1, 8, 8)))
    assert set(terms) == {"recon", "kl"} and out.latents.shape == (2, 4, 4, 3)
    sum(terms.values()).backward()
    assert not [n for n, p in tok.named_parameters() if p.grad is None]


def test_active_units_counts_the_channels_whose_mean_varies_across_the_batch():
    mean = torch.zeros(32, 4, 4, 3)
    mean[..., 1] = torch.randn(32, 4, 4)
    assert int(active_units(mean)) == 1
    assert int(active_units(mean[:1])) == 0


def test_a_collapsed_posterior_is_warned_about_with_kl_and_active_units():
    tok = tiny(collapse_after=2).train()
    with torch.no_grad():  # mean 0, logvar 0: exactly the prior
        tok.quant_conv.weight.zero_()
        tok.quant_conv.bias.zero_()
    images = tok.from_unit(torch.rand(4, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(images)  # step 1: too early to judge
    with pytest.warns(RuntimeWarning, match=r"collapsing.*KL per latent element 0 nats.*0 of 3 latent channels"):
        out = tok(images)
    assert float(out.stats["kl_per_dim"]) == 0.0 and int(out.stats["active_units"]) == 0


def test_bad_input_raises_errors_naming_what_is_wrong():
    with pytest.raises(ValueError, match=r"unknown fields \['quantizer'\]"):
        create_tokenizer("klvae", quantizer="fsq", **TINY)
    with pytest.raises(ValueError, match="takes no quantizer"):
        KLVAE(quantizer=torch.nn.Identity(), **TINY)
    with pytest.raises(ValueError, match="kl_weight"):
        tiny(kl_weight=-1.0)
    tok = tiny().eval()
    with pytest.raises(ValueError, match=r"latents must be a float tensor of shape \(B, 4, 4, 3\)"):
        tok.decode(torch.zeros(2, 4, 4, 2))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, 8, 8\)"):
        tok.encode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="not divisible"):
        tiny(image_size=9)

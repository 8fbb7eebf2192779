"""SoftVQ-VAE (quantkit/tokenizers/softvq_vae.py): a 1D soft tokenizer aligned with a frozen feature encoder."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkit.features import MAE, MAETrainConfig, train_mae
from quantkit.tokenizers import SoftVQVAE, create_tokenizer, list_tokenizers

TINY = dict(width=16, depth=1, heads=2, num_latent_tokens=4, token_size=8, quantizer_kwargs={"codebook_size": 32},
            align_hidden=16)


def _mae():
    torch.manual_seed(0)
    return MAE(width=16, depth=1, heads=2, decoder_width=16, decoder_heads=2)  # 16 patches of 16x16 digits


def test_registered_beside_titok_with_a_1d_token_sequence():
    assert {"softvq_vae", "titok"} <= set(list_tokenizers())
    tok = create_tokenizer("softvq_vae", feature_encoder=_mae(), **TINY)
    assert tok.token_shape == (4,) and tok.quantizer.soft
    ids = tok.encode(torch.rand(3, 1, 16, 16))
    assert ids.shape == (3, 4) and tok.decode(ids).shape == (3, 1, 16, 16)


def test_alignment_gradient_reaches_the_tokenizer_and_not_the_frozen_encoder():
    mae = _mae()
    tok = create_tokenizer("softvq_vae", feature_encoder=mae, **TINY)
    frozen = {k: v.clone() for k, v in mae.state_dict().items()}
    assert not any(k.startswith("mae") or "feature" in k for k in tok.state_dict())  # never saved ...
    assert {id(p) for p in tok.parameters()}.isdisjoint({id(p) for p in mae.parameters()})  # ... nor trained
    terms, _ = tok.training_loss(torch.rand(4, 1, 16, 16))
    terms["align"].backward()  # the alignment term alone
    for module in (tok.encoder, tok.align_mlp):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert tok.latent_tokens.grad.abs().sum() > 0 and tok.quantizer.codebook.grad.abs().sum() > 0
    assert tok.decoder.decoder_embed.weight.grad is None  # the decoder plays no part in the alignment
    assert all(p.grad is None for p in mae.parameters())
    opt = torch.optim.SGD(tok.parameters(), lr=1.0)
    opt.step()
    assert all(torch.equal(frozen[k], v) for k, v in mae.state_dict().items())


@pytest.mark.parametrize("similarity", ["cosine", "l2"])
def test_alignment_loss_is_the_similarity_of_repeated_tokens_to_the_features(similarity):
    mae = _mae()
    tok = create_tokenizer("softvq_vae", feature_encoder=mae, align_similarity=similarity, align_weight=0.5, **TINY)
    images = torch.rand(2, 1, 16, 16)
    torch.manual_seed(1)
    terms, _ = tok.training_loss(images)
    z = tok.quantizer(tok.encode_latents(images)).quantized  # (2, 4, 8) soft tokens
    rep = torch.stack([z[:, n // 4] for n in range(16)], dim=1)  # token l covers patches 4l .. 4l+3
    pred, y = tok.align_mlp(rep), mae.features(images).detach()
    expected = (1 - F.cosine_similarity(pred, y, dim=-1).mean() if similarity == "cosine"
                else (pred - y).square().sum(-1).mean())
    torch.testing.assert_close(terms["align"], 0.5 * expected, atol=1e-5, rtol=1e-5)
    assert set(terms) == {"recon", "quantizer", "align"}


def test_without_alignment_there_is_no_mlp_no_encoder_and_no_align_term():
    tok = create_tokenizer("softvq_vae", align_weight=0.0, **TINY)
    terms, _ = tok.training_loss(torch.rand(2, 1, 16, 16))
    assert tok.align_mlp is None and "align" not in terms


def test_checkpoint_rebuilds_the_mlp_without_the_encoder():
    tok = create_tokenizer("softvq_vae", feature_encoder=_mae(), **TINY).eval()
    config = tok.config.to_dict()
    assert (config["feature_dim"], config["feature_patches"]) == (16, 16)
    again = create_tokenizer("softvq_vae", config)  # no encoder, no feature_run: encode/decode still work
    again.load_state_dict(tok.state_dict())
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(again.eval().encode(x), tok.encode(x))
    with pytest.raises(ValueError, match="no feature encoder"):
        again.train().training_loss(x)


def test_a_user_encoder_with_the_wrong_output_is_refused_naming_the_expected_shape():
    class Pooled(nn.Module):
        def forward(self, x):
            return x.flatten(1)  # (B, 256)

    with pytest.raises(ValueError, match=r"\(B, N, F\) = \(2, N, F\) for images of shape \(2, 1, 16, 16\)"):
        create_tokenizer("softvq_vae", feature_encoder=Pooled(), **TINY)

    class SixPatches(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :96].reshape(-1, 6, 16)

    with pytest.raises(ValueError, match="N=6 patches, not a multiple of num_latent_tokens=4"):
        create_tokenizer("softvq_vae", feature_encoder=SixPatches(), **TINY)
    tok = create_tokenizer("softvq_vae", feature_encoder=_mae(), **TINY)

    class Wide(nn.Module):
        def forward(self, x):
            return x.reshape(-1, 8, 32)

    with pytest.raises(ValueError, match=r"aligns to features \(B, N, F\) = \(B, 16, 16\)"):
        tok.set_feature_encoder(Wide())


def test_alignment_needs_an_encoder_and_says_how_to_give_one():
    with pytest.raises(ValueError, match="feature_encoder=.*feature_run"):
        SoftVQVAE(**TINY)
    with pytest.raises(ValueError, match="align_similarity"):
        create_tokenizer("softvq_vae", feature_encoder=_mae(), align_similarity="dot", **TINY)


def test_feature_run_is_loaded_from_a_features_run_folder(tmp_path):
    run = train_mae(MAETrainConfig(steps=1, batch_size=4, warmup_steps=1, out_dir=str(tmp_path / "mae"),
                                   progress=False, model_config=dict(width=16, depth=1, heads=2, decoder_width=16,
                                                                     decoder_heads=2)))
    tok = create_tokenizer("softvq_vae", feature_run=str(run.out_dir), **TINY)
    terms, _ = tok.training_loss(torch.rand(2, 1, 16, 16))
    assert torch.isfinite(terms["align"]) and tok.config.feature_dim == 16

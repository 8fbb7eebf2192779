"""Tokenizers: the encode/decode contract over every registered quantizer, configuration errors, and checkpoint
import from synthetic state dicts written with the published key names and shapes."""
import math

import pytest
import torch

from quantkit.quantizers import Quantizer, example_kwargs, list_quantizers
from quantkit.quantizers._registry import quantizer_class
from quantkit.tokenizers import TiTok, create_tokenizer, list_tokenizers, tokenizer_class
from quantkit.tokenizers.checkpoints import CheckpointMismatch, import_checkpoint

# Small keyword sets per quantizer for a tokenizer whose latents have ``dim`` channels (dim given separately).
QUANTIZER_KWARGS = {
    "vq": dict(codebook_size=32),
    "softvq": dict(codebook_size=32),
    "lfq": dict(codebook_size=16),
    "fsq": dict(levels=[5, 4, 3]),
    "residual": dict(quantizer="fsq", depth=2, levels=[5, 4, 3]),
    "vqgan_lc": dict(codebook_size=32, feature_dim=16),
    "multiscale_residual": dict(codebook_size=32, patch_nums=[1, 2, 4]),
}
LATENT_DIM = {"fsq": 3, "residual": 3, "lfq": 4}
TINY = {
    "vqvae": dict(hidden=16, res_hidden=8, num_res_blocks=1),
    "vqgan": dict(ch=8, ch_mult=(1, 2, 2), z_channels=8, norm_groups=4),
    "titok": dict(width=16, depth=1, heads=2, num_latent_tokens=6),
    "softvq_vae": dict(width=16, depth=1, heads=2, num_latent_tokens=4, align_weight=0.0),  # alignment: test_softvq_vae
}


#: the discrete tokenizers (the continuous ones, e.g. klvae, have no quantizer: tests/test_klvae.py)
DISCRETE = [t for t in list_tokenizers() if not tokenizer_class(t).continuous]


def _quantizer_kwargs(quantizer):
    """(keywords, latent dim): the table above, else the registry's example (so a new quantizer is tested here
    the day it is registered)."""
    if quantizer in QUANTIZER_KWARGS:
        return QUANTIZER_KWARGS[quantizer], LATENT_DIM.get(quantizer, 8)
    example = example_kwargs(quantizer)
    return {k: v for k, v in example.items() if k != "dim"}, example["dim"]


def _tiny(name, quantizer, **kwargs):
    qkw, dim = _quantizer_kwargs(quantizer)
    dim_key = "token_size" if name in ("titok", "softvq_vae") else "embed_dim"
    return create_tokenizer(name, quantizer=quantizer, quantizer_kwargs=qkw, **{dim_key: dim}, **TINY[name],
                            **kwargs)


def _pairs():
    for tok in DISCRETE:
        for q in list_quantizers():
            if hasattr(quantizer_class(q), "encode_scales") and q not in QUANTIZER_KWARGS:
                continue  # a multi-scale quantizer needs scales that end at the latent grid
            if not (tok in ("titok", "softvq_vae") and hasattr(quantizer_class(q), "encode_scales")):
                yield tok, q


@pytest.mark.parametrize("tokenizer,quantizer", list(_pairs()))
def test_encode_decode_follow_the_contract(tokenizer, quantizer):
    tok = _tiny(tokenizer, quantizer).eval()
    images = tok.from_unit(torch.rand(3, *tok.image_shape))
    ids = tok.encode(images)
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (3, *tok.token_shape)
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
    out = tok.decode(ids)
    lo, hi = tok.pixel_range
    assert out.shape == images.shape and out.dtype == torch.float32 and out.min() >= lo and out.max() <= hi
    # encode is deterministic and decode(encode(x)) is the forward reconstruction, clamped (soft quantizers
    # reconstruct from a mixture of codes in forward, so only their hard decode is defined by the ids)
    assert torch.equal(tok.encode(images), ids)
    if tok.quantizer.soft:
        return
    fwd = tok(images).reconstruction.clamp(lo, hi)
    torch.testing.assert_close(out, fwd, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokenizer", DISCRETE)
def test_training_loss_reaches_every_trainable_parameter_of_the_autoencoder(tokenizer):
    quantizer = "fsq" if "fsq" in list_quantizers() else list_quantizers()[0]
    tok = _tiny(tokenizer, quantizer).train()
    images = tok.from_unit(torch.rand(2, *tok.image_shape))
    terms, _ = tok.training_loss(images)
    sum(terms.values()).backward()
    no_grad = [n for n, p in tok.named_parameters() if p.requires_grad and p.grad is None
               and not n.startswith("quantizer.") and "class_embedding" not in n]
    assert not no_grad


def test_token_shapes_of_grid_sequence_residual_and_multiscale():
    needed = {"fsq", "residual", "multiscale_residual"}
    if not needed <= set(list_quantizers()):
        pytest.skip(f"needs {needed}")
    assert _tiny("vqgan", "fsq").token_shape == (4, 4)
    assert _tiny("titok", "fsq").token_shape == (6,)
    assert _tiny("vqgan", "residual").token_shape == (4, 4, 2)
    ms = _tiny("vqgan", "multiscale_residual").eval()
    assert ms.token_shape == (1 + 4 + 16,)
    x = ms.from_unit(torch.rand(2, *ms.image_shape))
    scales = ms.encode_scales(x)
    assert [tuple(s.shape) for s in scales] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
    assert torch.equal(torch.cat([s.flatten(1) for s in scales], 1), ms.encode(x))
    assert ms.decode_scales(scales[:2]).shape == x.shape  # a coarse prefix decodes too
    with pytest.raises(ValueError, match="multi-scale"):
        _tiny("vqgan", "fsq").encode_scales(x)


def test_quantizer_dim_mismatch_names_both_numbers():
    q = list_quantizers()[0]
    with pytest.raises(ValueError, match=r"dim=5.*embed_dim"):
        create_tokenizer("vqgan", quantizer=q, quantizer_kwargs={**QUANTIZER_KWARGS.get(q, {}), "dim": 5},
                         embed_dim=8, **TINY["vqgan"])


def test_quantizer_instance_with_wrong_dim_is_rejected():
    class Tiny(Quantizer):
        pass

    with pytest.raises(ValueError, match="dim=3 but the encoder produces 8"):
        create_tokenizer("vqvae", quantizer=Tiny(3, 4), embed_dim=8, **TINY["vqvae"])


def test_bad_images_and_ids_are_rejected():
    tok = _tiny("vqvae", "fsq" if "fsq" in list_quantizers() else list_quantizers()[0]).eval()
    with pytest.raises(ValueError, match="images must have shape"):
        tok.encode(torch.rand(2, 3, 16, 16))
    ids = tok.encode(tok.from_unit(torch.rand(1, *tok.image_shape)))
    with pytest.raises(ValueError, match="must lie in"):
        tok.decode(ids + tok.vocab_size)
    with pytest.raises(ValueError, match="int64"):
        tok.decode(ids.int())
    with pytest.raises(ValueError, match="not divisible"):
        create_tokenizer("vqgan", image_size=18, **TINY["vqgan"])


def test_unknown_names_list_what_is_registered():
    with pytest.raises(ValueError, match="registered"):
        create_tokenizer("nope")
    with pytest.raises(ValueError, match="unknown quantizer"):
        create_tokenizer("vqvae", quantizer="nope")


def test_titok_legacy_reshape_scrambles_like_the_published_encoder():
    q = "fsq" if "fsq" in list_quantizers() else list_quantizers()[0]
    plain = _tiny("titok", q).eval()
    legacy = _tiny("titok", q, legacy_reshape=True).eval()
    legacy.load_state_dict(plain.state_dict())
    x = torch.rand(2, *plain.image_shape)
    enc_p, enc_l = plain.encoder, legacy.encoder
    # reference: the published code reshapes (B, K, W) to (B, W, K, 1) without a permute before conv_out
    captured = {}
    enc_l.ln_post.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    got = enc_l(x, legacy.latent_tokens)
    tokens = captured["x"]  # (B, K, W)
    b, k, w = tokens.shape
    expect = enc_l.conv_out(tokens.reshape(b, w, k, 1)).squeeze(-1).transpose(1, 2)
    torch.testing.assert_close(got, expect)
    assert not torch.allclose(got, enc_p(x, plain.latent_tokens))


def test_titok_two_stage_proxy_codes_head():
    q = "fsq" if "fsq" in list_quantizers() else list_quantizers()[0]
    vqgan = _tiny("vqgan", q).eval()
    titok = _tiny("titok", q, head="proxy_codes", proxy_tokenizer=vqgan, pixel_range=(0.0, 1.0))
    x = torch.rand(2, *titok.image_shape)
    terms, out = titok.training_loss(x)
    assert set(terms) == {"proxy_ce", "quantizer"} and out.reconstruction.shape == x.shape
    assert all(not p.requires_grad for p in titok.pixel_tokenizer.parameters())  # stage 1: VQGAN frozen
    stage2 = _tiny("titok", q, head="proxy_codes", proxy_tokenizer=_tiny("vqgan", q), stage=2)
    assert not any(p.requires_grad for p in stage2.encoder.parameters())
    assert any(p.requires_grad for p in stage2.pixel_tokenizer.decoder.parameters())
    with pytest.raises(ValueError, match="patch grid"):
        _tiny("titok", q, head="proxy_codes", proxy_tokenizer=vqgan, patch_size=8)


# ----------------------------------------------------------------------------------------------------------------
# checkpoint import: state dicts written from the published layouts (names and shapes), not from our modules


def _res(prefix, cin, cout):
    d = {f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
         f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.conv1.bias": (cout,),
         f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
         f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,)}
    if cin != cout:
        d.update({f"{prefix}.nin_shortcut.weight": (cout, cin, 1, 1), f"{prefix}.nin_shortcut.bias": (cout,)})
    return d


def _attn(prefix, c, fused=False):
    d = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,), f"{prefix}.proj_out.weight": (c, c, 1, 1),
         f"{prefix}.proj_out.bias": (c,)}
    names = [("qkv", 3 * c)] if fused else [("q", c), ("k", c), ("v", c)]
    for n, co in names:
        d.update({f"{prefix}.{n}.weight": (co, c, 1, 1), f"{prefix}.{n}.bias": (co,)})
    return d


def _conv(prefix, cout, cin, k):
    return {f"{prefix}.weight": (cout, cin, k, k), f"{prefix}.bias": (cout,)}


def _conv_vq_layout(style, ch=32, ch_mult=(1, 2), nres=1, z=8, embed=8, codes=16, in_ch=3):
    """Shapes of a taming / LlamaGen / VAR VQ autoencoder with attention at the lowest resolution and mid."""
    L = len(ch_mult)
    fused, qk = style == "var", 3 if style == "var" else 1
    blk = "res" if style == "llamagen" else "block"
    lvl = "conv_blocks" if style == "llamagen" else "down"
    mid = ["0", "1", "2"] if style == "llamagen" else ["block_1", "attn_1", "block_2"]
    s = {**_conv("encoder.conv_in", ch, in_ch, 3)}
    cin = ch
    for l, m in enumerate(ch_mult):
        cout = ch * m
        for b in range(nres):
            s.update(_res(f"encoder.{lvl}.{l}.{blk}.{b}", cin if b == 0 else cout, cout))
            if l == L - 1:
                s.update(_attn(f"encoder.{lvl}.{l}.attn.{b}", cout, fused))
        if l != L - 1:
            s.update(_conv(f"encoder.{lvl}.{l}.downsample.conv", cout, cout, 3))
        cin = cout
    top = ch * ch_mult[-1]
    for part in ("encoder", "decoder"):
        s.update(_res(f"{part}.mid.{mid[0]}", top, top))
        s.update(_attn(f"{part}.mid.{mid[1]}", top, fused))
        s.update(_res(f"{part}.mid.{mid[2]}", top, top))
    s.update({"encoder.norm_out.weight": (top,), "encoder.norm_out.bias": (top,), **_conv("encoder.conv_out", z, top, 3)})
    s.update(_conv("decoder.conv_in", top, z, 3))
    cin = top
    for step, l in enumerate(reversed(range(L))):  # decoder runs lowest resolution first
        cout = ch * ch_mult[l]
        name = f"decoder.conv_blocks.{step}" if style == "llamagen" else f"decoder.up.{l}"
        for b in range(nres + 1):
            s.update(_res(f"{name}.{blk}.{b}", cin if b == 0 else cout, cout))
            if l == L - 1:
                s.update(_attn(f"{name}.attn.{b}", cout, fused))
        if l != 0:
            s.update(_conv(f"{name}.upsample.conv", cout, cout, 3))
        cin = cout
    s.update({"decoder.norm_out.weight": (ch,), "decoder.norm_out.bias": (ch,), **_conv("decoder.conv_out", in_ch, ch, 3)})
    s.update(_conv("quant_conv", embed, z, qk))
    s.update(_conv("post_quant_conv", z, embed, qk))
    s["quantize.embedding.weight"] = (codes, embed)
    if style == "var":
        s.update({f"quantize.quant_resi.qresi_ls.{i}.weight": (embed, embed, 3, 3) for i in range(4)})
        s.update({f"quantize.quant_resi.qresi_ls.{i}.bias": (embed,) for i in range(4)})
        s["quantize.ema_vocab_hit_SV"] = (3, codes)
    if style == "llamagen":
        s["quantize.codebook_used"] = (65536,)
    if style == "taming":
        s["loss.discriminator.main.0.weight"] = (64, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(*shape, generator=g) * 0.05 for k, shape in s.items()}


def _titok_layout(width=32, patch=4, grid=4, depth=2, K=8, token=6, codes=16, in_ch=3):
    s = {"latent_tokens": (K, width), "encoder.patch_embed.weight": (width, in_ch, patch, patch),
         "encoder.patch_embed.bias": (width,), "encoder.class_embedding": (width,),
         "encoder.positional_embedding": (grid * grid + 1, width), "encoder.latent_token_positional_embedding": (K, width),
         "encoder.conv_out.weight": (token, width, 1, 1), "encoder.conv_out.bias": (token,),
         "decoder.decoder_embed.weight": (width, token), "decoder.decoder_embed.bias": (width,),
         "decoder.class_embedding": (width,), "decoder.positional_embedding": (grid * grid + 1, width),
         "decoder.mask_token": (1, 1, width), "decoder.latent_token_positional_embedding": (K, width),
         "decoder.ffn.0.weight": (patch * patch * in_ch, width, 1, 1), "decoder.ffn.0.bias": (patch * patch * in_ch,),
         "decoder.conv_out.weight": (in_ch, in_ch, 3, 3), "decoder.conv_out.bias": (in_ch,),
         "quantize.embedding.weight": (codes, token)}
    for part in ("encoder", "decoder"):
        for ln in ("ln_pre", "ln_post"):
            s.update({f"{part}.{ln}.weight": (width,), f"{part}.{ln}.bias": (width,)})
        for i in range(depth):
            p = f"{part}.transformer.{i}"
            s.update({f"{p}.ln_1.weight": (width,), f"{p}.ln_1.bias": (width,), f"{p}.ln_2.weight": (width,),
                      f"{p}.ln_2.bias": (width,), f"{p}.attn.in_proj_weight": (3 * width, width),
                      f"{p}.attn.in_proj_bias": (3 * width,), f"{p}.attn.out_proj.weight": (width, width),
                      f"{p}.attn.out_proj.bias": (width,), f"{p}.mlp.c_fc.weight": (4 * width, width),
                      f"{p}.mlp.c_fc.bias": (4 * width,), f"{p}.mlp.c_proj.weight": (width, 4 * width),
                      f"{p}.mlp.c_proj.bias": (width,)})
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(*shape, generator=g) * 0.05 for k, shape in s.items()}


def _needs(*names):
    missing = [n for n in names if n not in list_quantizers()]
    return pytest.mark.skipif(bool(missing), reason=f"quantizers {missing} not registered")


@_needs("vq")
@pytest.mark.parametrize("kind", ["taming", "llamagen"])
def test_conv_checkpoint_import_loads_every_tensor_and_runs(kind, tmp_path):
    state = _conv_vq_layout(kind)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state} if kind == "taming" else {"model": state, "steps": 3}, path)
    tok = import_checkpoint(path, kind, image_size=16)
    assert tok.token_shape == (8, 8) and tok.vocab_size == 16 and tok.pixel_range == (-1.0, 1.0)
    own = tok.state_dict()
    if kind == "taming":
        assert torch.equal(own["encoder.down.1.attn.0.q.weight"], state["encoder.down.1.attn.0.q.weight"])
        assert torch.equal(own["decoder.up.0.block.1.conv2.weight"], state["decoder.up.0.block.1.conv2.weight"])
    else:  # LlamaGen's decoder list is reversed: conv_blocks.0 is the lowest resolution, our up.1
        assert torch.equal(own["decoder.up.1.block.0.conv1.weight"], state["decoder.conv_blocks.0.res.0.conv1.weight"])
        assert torch.equal(own["decoder.up.0.block.1.conv2.weight"], state["decoder.conv_blocks.1.res.1.conv2.weight"])
        assert torch.equal(own["encoder.mid.attn_1.k.weight"], state["encoder.mid.1.k.weight"])
        assert tok.quantizer.metric == "cosine"
    cb = [v for k, v in own.items() if k.startswith("quantizer.") and tuple(v.shape) == (16, 8)]
    assert any(torch.equal(v, state["quantize.embedding.weight"]) for v in cb)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = tok.encode(x)
    assert ids.shape == (2, 8, 8) and torch.isfinite(tok.decode(ids)).all()


@_needs("multiscale_residual")
def test_var_import_splits_fused_qkv_and_maps_phi_convs():
    state = _conv_vq_layout("var")
    tok = import_checkpoint(state, "var", image_size=16, patch_nums=(1, 2, 4, 8))
    own = tok.state_dict()
    qkv = state["encoder.mid.attn_1.qkv.weight"]
    for i, n in enumerate("qkv"):
        assert torch.equal(own[f"encoder.mid.attn_1.{n}.weight"], qkv.chunk(3)[i])
    assert torch.equal(own["quantizer.phi.2.weight"], state["quantize.quant_resi.qresi_ls.2.weight"])
    assert tok.quant_conv.kernel_size == (3, 3) and tok.token_shape == (1 + 4 + 16 + 64,)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.isfinite(tok.decode(tok.encode(x))).all()


@_needs("vq")
def test_titok_import_runs_and_keeps_attention_weights():
    state = _titok_layout()
    tok = import_checkpoint(state, "titok")
    assert isinstance(tok, TiTok) and tok.token_shape == (8,) and tok.image_shape == (3, 16, 16)
    assert torch.equal(tok.state_dict()["encoder.transformer.1.attn.in_proj_weight"],
                       state["encoder.transformer.1.attn.in_proj_weight"])
    ids = tok.encode(torch.rand(2, 3, 16, 16))
    assert ids.shape == (2, 8) and torch.isfinite(tok.decode(ids)).all()
    legacy = dict(state)
    legacy["decoder.ffn.2.weight"] = torch.zeros(1024, 64, 1, 1)
    with pytest.raises(CheckpointMismatch, match="proxy codes"):
        import_checkpoint(legacy, "titok")


@_needs("vq")
def test_truncated_or_foreign_checkpoint_names_the_keys(tmp_path):
    state = _conv_vq_layout("taming")
    del state["decoder.up.0.block.1.conv2.weight"]
    with pytest.raises(CheckpointMismatch, match=r"missing keys: decoder\.up\.0\.block\.1\.conv2\.weight"):
        import_checkpoint({"state_dict": state}, "taming", image_size=16)
    bad = _conv_vq_layout("taming")
    bad["decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    with pytest.raises(CheckpointMismatch, match=r"decoder\.conv_out\.weight: file \(3, 32, 1, 1\)"):
        import_checkpoint(bad, "taming", image_size=16)
    with pytest.raises(CheckpointMismatch, match="not a LlamaGen VQ checkpoint"):
        import_checkpoint(_conv_vq_layout("taming"), "llamagen", image_size=16)
    cut = tmp_path / "cut.ckpt"
    torch.save({"state_dict": _conv_vq_layout("taming")}, tmp_path / "full.ckpt")
    cut.write_bytes((tmp_path / "full.ckpt").read_bytes()[:5000])
    with pytest.raises(CheckpointMismatch, match="could not read"):
        import_checkpoint(cut, "taming")


def test_parameter_counts_are_small_by_default():
    q = "fsq" if "fsq" in list_quantizers() else list_quantizers()[0]
    kw = QUANTIZER_KWARGS.get(q, {})
    dim = LATENT_DIM.get(q, 8)
    for name, key in (("vqvae", "embed_dim"), ("vqgan", "embed_dim"), ("titok", "token_size")):
        tok = create_tokenizer(name, quantizer=q, quantizer_kwargs=kw, **{key: dim})
        assert sum(p.numel() for p in tok.parameters()) < 1_000_000, name
        assert math.prod(tok.token_shape) <= 16

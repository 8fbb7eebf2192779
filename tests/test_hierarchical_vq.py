"""Hierarchical (multi-scale residual) VQ: quantkit's quantizer against closed forms, and the ``HierarchicalVQ``
adapter against vector-quantize-pytorch with the peer's codebooks and convolutions copied in."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _peer_signature import assert_peer_signature

import quantkit.compat.vector_quantize_pytorch as compat
from quantkit.compat.vector_quantize_pytorch import UnsupportedKeywordError, keyword_table_markdown
from quantkit.quantizers import HierarchicalVQ, list_quantizers

DOCS = Path(__file__).resolve().parents[1] / "docs" / "compat_vector_quantize_pytorch.md"


def test_hierarchical_vq_is_registered_so_the_invariant_suite_covers_it():
    assert "hierarchical_vq" in list_quantizers()


def test_output_is_the_sum_of_upsampled_residual_codes():
    """phi off: level k quantizes the pooled residual of the earlier levels, and x_hat sums their bilinear
    upsamplings (closed form, recomputed here in float64 from the returned indices)."""
    torch.manual_seed(0)
    q = HierarchicalVQ(4, (8, 16, 16), (1, 2, 4), shared_codebook=False, phi_ratio=0.0).eval()
    x = torch.randn(3, 4, 4, 4)
    out = q(x)
    residual, x_hat = x.double(), torch.zeros_like(x, dtype=torch.float64)
    for k, idx in enumerate(q.split_scales(out.indices)):
        codebook = q.level_vq(k).codebook.weight.double()  # (K_k, C)
        down = F.adaptive_avg_pool2d(residual, q.level_shapes[k]).permute(0, 2, 3, 1)  # (B, h, w, C)
        nearest = torch.cdist(down.reshape(-1, 4), codebook).argmin(-1).reshape(idx.shape)
        assert torch.equal(idx, nearest), f"level {k}"
        codes = codebook[idx].permute(0, 3, 1, 2)
        if k < 2:
            codes = F.interpolate(codes, size=(4, 4), mode="bilinear", align_corners=False)
        x_hat, residual = x_hat + codes, residual - codes
    torch.testing.assert_close(out.quantized, x_hat.float(), rtol=1e-5, atol=1e-5)


def test_nested_dropout_keeps_a_random_prefix_with_the_configured_frequency():
    torch.manual_seed(0)
    q = HierarchicalVQ(4, 8, (1, 2, 4), phi_ratio=0.0, nested_dropout=0.5, seed=0, ema=None)
    x = torch.randn(2, 4, 4, 4)
    cutoffs = [q._cutoff() for _ in range(2000)]  # the per-batch draw forward makes (a forward per draw is slow)
    cut = [c for c in cutoffs if c is not None]
    assert 900 <= len(cut) <= 1100  # Binomial(2000, 0.5): 1000 +- 100 is beyond 4.4 sigma
    assert set(cut) == {0, 1} and abs(cut.count(0) - len(cut) / 2) < 100  # uniform over the kept prefixes
    q(x)
    assert q.last_cutoff in (None, 0, 1)
    # the truncated output is the decode of the kept levels (a -1 cell adds nothing with phi off)
    q.nested_dropout = 1.0
    out = q(x)
    c = q.last_cutoff
    counts = [1, 4, 16]
    dropped = out.indices.clone()
    dropped[:, sum(counts[:c + 1]):] = -1
    torch.testing.assert_close(out.quantized, q.decode(dropped), rtol=1e-6, atol=1e-6)
    assert q.eval()(x).indices.shape == (2, 21) and q.last_cutoff is None


def test_bad_options_raise_naming_them():
    with pytest.raises(ValueError, match="scales"):
        HierarchicalVQ(4, 8, (2, 1))
    with pytest.raises(ValueError, match="shared_codebook"):
        HierarchicalVQ(4, (8, 16), (1, 2))
    with pytest.raises(ValueError, match="nested_dropout"):
        HierarchicalVQ(4, 8, (1, 2), nested_dropout=1.5)
    with pytest.raises(ValueError, match="mask"):
        HierarchicalVQ(4, 8, (1, 2))(torch.randn(2, 4, 2, 2), mask=torch.ones(2, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------------
# the adapter against the peer

peer = pytest.importorskip("vector_quantize_pytorch")

CASES = {
    "image": (dict(scales=(1, 2, 4), accept_image_fmap=True), (2, 8, 4, 4)),
    "sequence": (dict(scales=(1, 3, 8)), (2, 8, 8)),
    "per_level_channel_last": (dict(scales=(1, 2, 4), accept_image_fmap=True, shared_codebook=False,
                                    codebook_size=(16, 32, 32), share_quant_resi=0, channel_first=False),
                               (2, 4, 4, 8)),
    "video": (dict(scales=((1, 1, 1), (2, 2, 2)), accept_3d_fmap=True, share_quant_resi=2), (2, 8, 2, 3, 3)),
}


def _pair(**kwargs):
    """(peer after one EMA training step, adapter holding its weights)."""
    torch.manual_seed(0)
    kwargs = {"codebook_size": 32, "kmeans_init": False, **kwargs}
    p = peer.HierarchicalVQ(dim=8, **kwargs)
    a = compat.HierarchicalVQ(dim=8, **kwargs)
    return p, a


def _mask_shape(options, shape):
    return (shape[0], *(shape[2:] if options.get("channel_first", True) else shape[1:-1]))


@pytest.mark.parametrize("case", list(CASES))
def test_hierarchical_vq_matches_peer_in_eval(case):
    options, shape = CASES[case]
    p, a = _pair(**options)
    x = torch.randn(*shape)
    p.train()(x)  # codebooks away from their initialization
    a.load_peer_state_dict(p.state_dict())
    p.eval(), a.eval()
    mask = torch.rand(_mask_shape(options, shape), generator=torch.Generator().manual_seed(1)) > 0.3
    for kwargs in (dict(), dict(mask=mask)):
        (r_p, i_p, l_p), (r_a, i_a, l_a) = p(x, **kwargs), a(x, **kwargs)
        torch.testing.assert_close(r_a, r_p, rtol=1e-6, atol=1e-6)
        assert len(i_a) == len(i_p) and all(u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(i_p, i_a))
        assert float(l_a) == float(l_p.detach()) == 0.0
        # decode, with the -1 cells of the masked output included
        torch.testing.assert_close(a.get_output_from_indices(i_a), p.get_output_from_indices(i_p), rtol=1e-6,
                                   atol=1e-6)


def test_lens_and_training_steps_match_peer():
    """Deterministic training (no dead-code revival): three EMA steps move both codebooks alike and the losses
    agree; lens masks the tail of each sequence as in the peer."""
    p, a = _pair(scales=(1, 2, 8), threshold_ema_dead_code=0, decay=0.8)
    a.load_peer_state_dict(p.state_dict())
    lens = torch.tensor([8, 5])
    for step in range(3):
        x = torch.randn(2, 8, 8)
        (r_p, i_p, l_p), (r_a, i_a, l_a) = p.train()(x, lens=lens), a.train()(x, lens=lens)
        assert all(torch.equal(u, v) for u, v in zip(i_p, i_a)), f"step {step}"
        torch.testing.assert_close(l_a, l_p, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r_a, r_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.core.vqs[0].codebook.weight, p.vq._codebook.embed[0], rtol=1e-5, atol=1e-6)


def test_keywords_defaults_and_forward_are_the_peers():
    assert_peer_signature(compat.HierarchicalVQ, peer.HierarchicalVQ)
    assert keyword_table_markdown(compat.HierarchicalVQ.keywords) in DOCS.read_text()


def test_unsupported_values_raise_naming_the_keyword():
    with pytest.raises(UnsupportedKeywordError, match="orthogonal_reg_weight"):
        compat.HierarchicalVQ(dim=8, codebook_size=16, scales=(1, 2), orthogonal_reg_weight=1.0)
    a = compat.HierarchicalVQ(dim=8, codebook_size=16, scales=(1, 2), kmeans_init=False)
    with pytest.raises(UnsupportedKeywordError, match="indices"):
        a(torch.randn(1, 8, 2), indices=torch.zeros(1, 2, dtype=torch.long))

"""Every usage example of vector-quantize-pytorch's README (1.32.0) for the classes quantkit mirrors, run against
``quantkit.compat.vector_quantize_pytorch`` with only the import changed.

Shapes are the ones the peer returns (where its README comments are stale, e.g. a loss shown as ``(1,)`` that is a
scalar, the peer's actual shape is asserted). Examples built on options quantkit does not implement (DiVeQ,
orthogonal regularization) assert the documented error instead. Constructors are the README's; where its input would
take seconds on a shared CI core (1024 tokens against 8 x 1024 codes), the sequence is cut to ``N`` tokens (and the
image to 8 x 8), which changes no shape rule.
"""
import pytest
import torch

from quantkit.compat.vector_quantize_pytorch import (FSQ, LFQ, GroupedResidualVQ, ResidualFSQ, ResidualLFQ,
                                                     ResidualVQ, UnsupportedKeywordError, VectorQuantize)

N = 128  # tokens for the examples with large codebooks (the README uses 1024)


def test_usage_vector_quantize():
    vq = VectorQuantize(dim=256, codebook_size=512, decay=0.8, commitment_weight=1.0)
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024) and commit_loss.shape == ()
    assert indices.dtype == torch.int64


def test_residual_vq_and_all_codes():
    residual_vq = ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024)
    x = torch.randn(1, N, 256)
    quantized, indices, commit_loss = residual_vq(x)
    assert (quantized.shape, indices.shape, commit_loss.shape) == ((1, N, 256), (1, N, 8), (8,))
    quantized, indices, commit_loss, all_codes = residual_vq(x, return_all_codes=True)
    assert all_codes.shape == (8, 1, N, 256)


def test_residual_vq_diveq():
    residual_vq = ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024, diveq=True)
    quantized, indices, commit_loss = residual_vq(torch.randn(1, 1024, 256))
    assert (quantized.shape, indices.shape, commit_loss.shape) == ((1, 1024, 256), (1, 1024, 8), (8,))


def test_residual_vq_shared_codebook_stochastic_sampling():
    residual_vq = ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024, stochastic_sample_codes=True,
                             sample_codebook_temp=0.1, shared_codebook=True)
    x = torch.randn(1, N, 256)
    quantized, indices, commit_loss = residual_vq(x)
    assert (quantized.shape, indices.shape, commit_loss.shape) == ((1, N, 256), (1, N, 8), (8,))


def test_grouped_residual_vq():
    residual_vq = GroupedResidualVQ(dim=256, num_quantizers=8, groups=2, codebook_size=1024)
    x = torch.randn(1, N, 256)
    quantized, indices, commit_loss = residual_vq(x)
    assert (quantized.shape, indices.shape, commit_loss.shape) == ((1, N, 256), (2, 1, N, 8), (2, 8))


def test_kmeans_init():
    residual_vq = ResidualVQ(dim=256, codebook_size=256, num_quantizers=4, kmeans_init=True, kmeans_iters=10)
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = residual_vq(x)
    assert (quantized.shape, indices.shape, commit_loss.shape) == ((1, 1024, 256), (1, 1024, 4), (4,))
    assert all(bool(layer.codebook.initialized) for layer in residual_vq.rq.layers)


def test_rotation_trick_flag():
    assert VectorQuantize(dim=256, codebook_size=256, rotation_trick=True).quantizers[0].gradient == "rotation"
    assert VectorQuantize(dim=256, codebook_size=256, rotation_trick=False).quantizers[0].gradient == \
        "straight_through"


def test_directional_reparam_needs_dead_code_replacement_as_in_the_peer():
    with pytest.raises(ValueError, match="threshold_ema_dead_code"):
        VectorQuantize(dim=256, codebook_size=256, directional_reparam=True, directional_reparam_variance=5e-3)
    vq = VectorQuantize(dim=256, codebook_size=256, directional_reparam=True, threshold_ema_dead_code=2)
    quantized, indices, loss = vq(torch.randn(1, 1024, 256))
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024) and float(loss.detach()) == 0.0


@pytest.mark.parametrize("option", [dict(codebook_dim=16), dict(use_cosine_sim=True),
                                    dict(threshold_ema_dead_code=2, codebook_size=512)])
def test_codebook_usage_options(option):
    vq = VectorQuantize(dim=256, **{"codebook_size": 256, **option})
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = vq(x)
    assert (quantized.shape, indices.shape, commit_loss.shape) == ((1, 1024, 256), (1, 1024), ())


def test_orthogonal_regularization_is_refused_by_name():
    with pytest.raises(UnsupportedKeywordError, match="orthogonal_reg_weight"):
        VectorQuantize(dim=256, codebook_size=256, accept_image_fmap=True, orthogonal_reg_weight=10,
                       orthogonal_reg_max_codes=128, orthogonal_reg_active_codes_only=False)


def test_multi_headed_vq_image_fmap():
    vq = VectorQuantize(dim=256, codebook_dim=32, heads=8, separate_codebook_per_head=True, codebook_size=8196,
                        accept_image_fmap=True)
    img_fmap = torch.randn(1, 256, 8, 8)
    quantized, indices, loss = vq(img_fmap)
    assert (quantized.shape, indices.shape, loss.shape) == ((1, 256, 8, 8), (1, 8, 8, 8), ())


def test_fsq():
    quantizer = FSQ(levels=[8, 5, 5, 5])
    x = torch.randn(1, 1024, 4)
    xhat, indices = quantizer(x)
    assert xhat.shape == (1, 1024, 4) and indices.shape == (1, 1024) and indices.dtype == torch.int32
    assert torch.all(xhat == quantizer.indices_to_codes(indices))


def test_residual_fsq():
    residual_fsq = ResidualFSQ(dim=256, levels=[8, 5, 5, 3], num_quantizers=8)
    x = torch.randn(1, 1024, 256)
    residual_fsq.eval()
    quantized, indices = residual_fsq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8)
    quantized_out = residual_fsq.get_output_from_indices(indices)
    assert quantized_out.shape == (1, 1024, 256)
    assert torch.all(quantized == quantized_out)


def test_lfq_image():
    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, entropy_aux_loss = quantizer(image_feats, inv_temperature=100.0)
    assert (quantized.shape, indices.shape, entropy_aux_loss.shape) == ((1, 16, 32, 32), (1, 32, 32), ())
    assert (quantized == quantizer.indices_to_codes(indices)).all()


def test_lfq_sequence_and_video():
    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
    seq = torch.randn(1, 32, 16)
    quantized, *_ = quantizer(seq)
    assert seq.shape == quantized.shape
    video_feats = torch.randn(1, 16, 10, 8, 8)
    quantized, *_ = quantizer(video_feats)
    assert video_feats.shape == quantized.shape


def test_lfq_multiple_codebooks():
    quantizer = LFQ(codebook_size=4096, dim=16, num_codebooks=4)
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, entropy_aux_loss = quantizer(image_feats)
    assert (quantized.shape, indices.shape, entropy_aux_loss.shape) == ((1, 16, 32, 32), (1, 32, 32, 4), ())
    assert image_feats.shape == quantized.shape
    assert (quantized == quantizer.indices_to_codes(indices)).all()


def test_residual_lfq():
    residual_lfq = ResidualLFQ(dim=256, codebook_size=256, num_quantizers=8)
    x = torch.randn(1, 1024, 256)
    residual_lfq.eval()
    quantized, indices, commit_loss = residual_lfq(x)
    assert (quantized.shape, indices.shape, commit_loss.shape) == ((1, 1024, 256), (1, 1024, 8), (8,))
    quantized_out = residual_lfq.get_output_from_indices(indices)
    assert quantized_out.shape == (1, 1024, 256)
    assert torch.all(quantized == quantized_out)

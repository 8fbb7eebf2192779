"""Native GroupedQuantizer: each group is its own quantizer on its own channels (compared with the groups run one
by one), indices group-major, and option variants through ``check_quantizer``."""
import pytest
import torch

from quantkit import testing
from quantkit.quantizers import GroupedQuantizer, ResidualQuantizer, create_quantizer


def test_each_group_equals_its_own_quantizer_on_its_channels():
    torch.manual_seed(0)
    q = GroupedQuantizer(12, groups=3, quantizer="residual",
                         quantizer_kwargs=dict(quantizer="lfq", codebook_size=16, depth=2, layer_scale=0.5)).eval()
    x = torch.randn(5, 7, 12)
    out = q(x)
    assert out.indices.shape == (5, 7, 6)
    loss = torch.zeros(())
    for g, (inner, chunk) in enumerate(zip(q.quantizers, x.chunk(3, dim=-1))):
        assert isinstance(inner, ResidualQuantizer)
        ref = inner.train()(chunk)
        inner.eval()
        assert torch.equal(out.indices[..., 2 * g:2 * g + 2], inner(chunk).indices)
        assert torch.equal(out.quantized[..., 4 * g:4 * g + 4], inner(chunk).quantized)
        loss = loss + ref.loss
    q.train()
    torch.testing.assert_close(q(x).loss, loss)  # the groups' losses add up
    q.loss_reduction = "mean"
    torch.testing.assert_close(q(x).loss, loss / 3)
    assert torch.equal(q.decode(out.indices), out.quantized)


def test_single_index_groups_and_skipped_depths_decode():
    q = GroupedQuantizer(6, groups=2, quantizer="fsq", quantizer_kwargs=dict(levels=(5, 4, 3))).eval()
    x = torch.randn(40, 6)
    out = q(x)
    assert out.indices.shape == (40, 2)
    assert torch.equal(out.indices[:, 1], q.quantizers[1].encode(x[:, 3:]))
    r = GroupedQuantizer(6, groups=2, quantizer="residual", quantizer_kwargs=dict(
        quantizer="fsq", levels=(5, 4, 3), depth=3, quantize_dropout=1.0, seed=0)).train()
    idx = r(x).indices  # some depths skipped: -1, decoded as zero
    assert bool((idx == -1).any())
    parts = [inner.decode(i) for inner, i in zip(r.quantizers, idx.unflatten(-1, (2, 3)).unbind(-2))]
    torch.testing.assert_close(r.decode(idx), torch.cat(parts, -1))


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="groups"):
        GroupedQuantizer(7, groups=2, quantizer="fsq", quantizer_kwargs=dict(levels=(5, 4, 3)))
    with pytest.raises(ValueError, match="dim"):
        GroupedQuantizer(6, groups=2, quantizer="fsq", quantizer_kwargs=dict(levels=(5, 4, 3), dim=3))
    with pytest.raises(ValueError, match="loss_reduction"):
        GroupedQuantizer(6, groups=2, quantizer="fsq", quantizer_kwargs=dict(levels=(5, 4, 3)), loss_reduction="max")
    q = create_quantizer("grouped", dim=6, groups=2, quantizer="fsq", quantizer_kwargs=dict(levels=(5, 4, 3)))
    with pytest.raises(ValueError, match="indices"):
        q.decode(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="indices"):
        q.decode(torch.full((4, 2), 60, dtype=torch.int64))


@pytest.mark.parametrize("kwargs", [
    dict(dim=8, groups=2, quantizer="residual", quantizer_kwargs=dict(quantizer="vq", codebook_size=8, depth=2)),
    dict(dim=8, groups=4, quantizer="lfq", quantizer_kwargs=dict(codebook_size=4, spherical=True)),
], ids=["residual_vq", "bsq"])
def test_grouped_variants_pass_check_quantizer(kwargs):
    torch.manual_seed(0)
    make = lambda: GroupedQuantizer(**kwargs)  # noqa: E731
    testing.check_quantizer(make(), make=make)

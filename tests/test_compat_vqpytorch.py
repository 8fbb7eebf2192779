"""quantkit.compat.vector_quantize_pytorch against the peer (a test dependency) and against the peer bugs it fixes.

- side by side: with the peer's weights copied in (``load_peer_state_dict``), adapter and peer return the same
  indices and outputs in eval for VectorQuantize, ResidualVQ, FSQ and LFQ (and the grouped / residual variants);
- the contract: signatures and defaults are the peer's, unsupported keywords raise naming themselves, the docs table
  is the one the code parses;
- the fixed bugs: ResidualVQ with accept_image_fmap, mask with codebook_dim != dim, index drift in training.
"""
import copy
import inspect
from pathlib import Path

import pytest
import torch

import quantkit.compat.vector_quantize_pytorch as compat
from quantkit.compat.vector_quantize_pytorch import UnsupportedKeywordError, keyword_table_markdown

peer = pytest.importorskip("vector_quantize_pytorch")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "compat_vector_quantize_pytorch.md"
CLASSES = ["VectorQuantize", "ResidualVQ", "GroupedResidualVQ", "FSQ", "ResidualFSQ", "LFQ", "ResidualLFQ"]


def _pair(name: str, **kwargs):
    """(peer module, adapter module holding the peer's weights), both in eval."""
    p = getattr(peer, name)(**kwargs)
    a = getattr(compat, name)(**kwargs).load_peer_state_dict(p.state_dict())
    return p.eval(), a.eval()


def _assert_same(peer_out, adapter_out, atol=0.0):
    assert len(peer_out) == len(adapter_out)
    for u, v in zip(peer_out, adapter_out):
        assert u.shape == v.shape and u.dtype == v.dtype
        if u.is_floating_point():
            torch.testing.assert_close(v, u, atol=atol, rtol=0)
        else:
            assert torch.equal(u, v)


# ----------------------------------------------------------------------------------------------------------------
# side by side, eval


VQ_CASES = [dict(), dict(codebook_dim=8), dict(use_cosine_sim=True), dict(heads=4, codebook_dim=8),
            dict(heads=4, codebook_dim=8, separate_codebook_per_head=True)]


@pytest.mark.parametrize("options", VQ_CASES, ids=lambda o: ",".join(o) or "default")
def test_vector_quantize_matches_peer_in_eval(options):
    p, a = _pair("VectorQuantize", dim=32, codebook_size=64, **options)
    x = torch.randn(2, 50, 32)
    atol = 1e-6 if options.get("use_cosine_sim") else 0.0  # quantkit re-normalizes cosine codes on lookup
    _assert_same(p(x), a(x), atol=atol)
    indices = a(x)[1]
    for ours, theirs in [(a.get_output_from_indices(indices), p.get_output_from_indices(indices)),
                         (a.get_codes_from_indices(indices), p.get_codes_from_indices(indices))]:
        # Heads sharing one codebook: the peer leaves a (heads, codebook_dim) pair unmerged; quantkit returns what
        # forward returned, (..., heads * codebook_dim).
        theirs = theirs.flatten(-2) if theirs.dim() > ours.dim() else theirs
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


@pytest.mark.parametrize("layout", ["image", "3d", "channel_first_sequence", "single_token"])
def test_vector_quantize_layouts_match_peer(layout):
    options, x = {"image": (dict(accept_image_fmap=True), torch.randn(2, 16, 5, 6)),
                  "3d": (dict(accept_3d_fmap=True), torch.randn(2, 16, 3, 4, 5)),
                  "channel_first_sequence": (dict(channel_last=False), torch.randn(2, 16, 30)),
                  "single_token": (dict(), torch.randn(7, 16))}[layout]
    p, a = _pair("VectorQuantize", dim=16, codebook_size=32, **options)
    _assert_same(p(x), a(x))


def test_vector_quantize_after_peer_training_matches_peer():
    """EMA buffers, k-means state and projections copy over: a peer trained a few steps, then frozen, agrees."""
    p = peer.VectorQuantize(dim=32, codebook_size=64, codebook_dim=8, kmeans_init=True, threshold_ema_dead_code=1)
    for _ in range(3):
        p(torch.randn(4, 64, 32))
    a = compat.VectorQuantize(dim=32, codebook_size=64, codebook_dim=8, kmeans_init=True, threshold_ema_dead_code=1)
    a.load_peer_state_dict(p.state_dict())
    p.eval(), a.eval()
    x = torch.randn(2, 40, 32)
    _assert_same(p(x), a(x))


@pytest.mark.parametrize("options", [dict(), dict(codebook_dim=8), dict(shared_codebook=True),
                                     dict(use_cosine_sim=True)], ids=lambda o: ",".join(o) or "default")
def test_residual_vq_matches_peer_in_eval(options):
    p, a = _pair("ResidualVQ", dim=32, codebook_size=64, num_quantizers=3, **options)
    x = torch.randn(2, 50, 32)
    _assert_same(p(x, return_all_codes=True), a(x, return_all_codes=True), atol=1e-5)
    indices = a(x)[1]
    torch.testing.assert_close(a.get_output_from_indices(indices), p.get_output_from_indices(indices), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("name,options", [
    ("VectorQuantize", dict(dim=32, codebook_size=64, codebook_dim=8, commitment_weight=0.5)),
    ("ResidualVQ", dict(dim=32, codebook_size=64, num_quantizers=3, commitment_weight=0.5)),
    ("LFQ", dict(dim=32, codebook_size=1024, commitment_loss_weight=0.25)),
])
def test_training_loss_matches_peer(name, options):
    """One training step from the same weights: the same indices and the same total loss (the residual classes'
    per-level vector carries quantkit's sum spread evenly, so its sum is what matches)."""
    p, a = _pair(name, **options)
    p.train(), a.train()
    x = torch.randn(2, 50, 32)
    out_p, out_a = p(x), a(x)
    assert torch.equal(out_p[1], out_a[1])
    torch.testing.assert_close(out_a[2].sum(), out_p[2].sum(), atol=1e-5, rtol=1e-4)


def test_grouped_residual_vq_matches_peer_in_eval():
    p, a = _pair("GroupedResidualVQ", dim=32, groups=2, codebook_size=32, num_quantizers=3)
    x = torch.randn(2, 40, 32)
    _assert_same(p(x), a(x), atol=1e-5)


@pytest.mark.parametrize("options,shape", [
    (dict(levels=[8, 5, 5, 5]), (2, 50, 4)),
    (dict(levels=[8, 5, 5, 5], dim=32), (2, 50, 32)),
    (dict(levels=[7, 5, 4], dim=24, num_codebooks=3), (2, 50, 24)),
    (dict(levels=[8, 5, 5, 5]), (2, 4, 6, 7)),  # channel-first image
    (dict(levels=[8, 6, 5], channel_first=True), (2, 3, 40)),
], ids=["default", "projection", "codebooks", "image", "channel_first"])
def test_fsq_matches_peer_in_eval(options, shape):
    p, a = _pair("FSQ", **options)
    x = torch.randn(*shape) * 2
    _assert_same(p(x), a(x))
    indices = a(x)[1]
    torch.testing.assert_close(a.indices_to_codes(indices), p.indices_to_codes(indices), atol=0, rtol=0)


@pytest.mark.parametrize("options,shape", [
    (dict(codebook_size=1024, dim=10), (2, 50, 10)),
    (dict(codebook_size=256, dim=32), (2, 50, 32)),
    (dict(codebook_size=16, dim=32, num_codebooks=4), (2, 50, 32)),
    (dict(codebook_size=1024, dim=10), (2, 10, 5, 6)),  # channel-first image
    (dict(codebook_size=1024, dim=10, channel_first=True), (2, 10, 50)),  # channel-first sequence
], ids=["default", "projection", "codebooks", "image", "channel_first"])
def test_lfq_matches_peer_in_eval(options, shape):
    p, a = _pair("LFQ", **options)
    x = torch.randn(*shape)
    out_p, out_a = p(x), a(x)
    assert type(out_a).__name__ == "Return" and out_a._fields == out_p._fields
    _assert_same(out_p, out_a)
    torch.testing.assert_close(a.indices_to_codes(out_a.indices), p.indices_to_codes(out_p.indices), atol=0, rtol=0)


def test_residual_lfq_matches_peer_in_eval():
    p, a = _pair("ResidualLFQ", dim=32, codebook_size=256, num_quantizers=3)
    x = torch.randn(2, 50, 32)
    _assert_same(p(x, return_all_codes=True), a(x, return_all_codes=True))


def test_residual_fsq_has_the_peers_shapes_and_decodes_exactly():
    """ResidualFSQ channel-first: same shapes and dtypes as the peer, including channel-first indices
    (B, Q, *spatial), and an exact eval round trip (the numbers are tested in test_compat_vqpytorch_options.py). (The peer's
    return_all_codes raises with is_channel_first; the adapter's returns (Q, B, *spatial, len(levels)).)"""
    x = torch.randn(2, 16, 5, 6)
    p, a = _pair("ResidualFSQ", levels=[8, 5, 5, 3], num_quantizers=4, dim=16, is_channel_first=True)
    (q_p, i_p), (q_a, i_a, codes_a) = p(x), a(x, return_all_codes=True)
    assert (q_a.shape, i_a.shape, i_a.dtype) == (q_p.shape, i_p.shape, i_p.dtype)
    assert torch.equal(a.get_output_from_indices(i_a), q_a)
    torch.testing.assert_close(a.project_out(codes_a.sum(0)).movedim(-1, 1), q_a)


# ----------------------------------------------------------------------------------------------------------------
# the contract: signatures, defaults, refusals, docs


@pytest.mark.parametrize("name", CLASSES)
def test_constructor_keywords_and_defaults_are_the_peers(name):
    ours = inspect.signature(getattr(compat, name)).parameters
    for key, param in inspect.signature(getattr(peer, name)).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        assert key in ours, f"{name}: peer keyword {key!r} missing"
        if key != "straight_through_activation":  # the peer's default is a fresh nn.Identity()
            assert repr(ours[key].default) == repr(param.default), f"{name}.{key}: default differs"


@pytest.mark.parametrize("name", CLASSES)
def test_forward_keywords_are_the_peers(name):
    theirs = list(inspect.signature(getattr(peer, name).forward).parameters)
    ours = list(inspect.signature(getattr(compat, name).forward).parameters)
    assert ours == theirs


@pytest.mark.parametrize("name,keyword,value", [
    ("VectorQuantize", "orthogonal_reg_weight", 10.0), ("VectorQuantize", "straight_through", True),
    ("VectorQuantize", "in_place_codebook_optimizer", torch.optim.SGD),
    ("FSQ", "noise_dropout", 0.1),
    ("LFQ", "force_quantization_f32", False), ("ResidualLFQ", "quantize_dropout_multiple_of", 2),
])
def test_unsupported_keyword_raises_naming_it(name, keyword, value):
    required = {"VectorQuantize": dict(dim=8, codebook_size=16), "ResidualVQ": dict(dim=8, codebook_size=16,
                num_quantizers=2), "FSQ": dict(levels=[5, 5]), "LFQ": dict(dim=4),
                "ResidualLFQ": dict(dim=8, codebook_size=16, num_quantizers=2)}[name]
    with pytest.raises(UnsupportedKeywordError, match=keyword):
        getattr(compat, name)(**required, **{keyword: value})


def test_unknown_keyword_is_a_type_error_and_forward_options_are_refused_by_name():
    with pytest.raises(TypeError, match="codebook_sz"):
        compat.VectorQuantize(dim=8, codebook_size=16, codebook_sz=3)
    vq = compat.VectorQuantize(dim=8, codebook_size=16)
    with pytest.raises(UnsupportedKeywordError, match="ema_update"):
        vq(torch.randn(2, 5, 8), ema_update=False)
    with pytest.raises(UnsupportedKeywordError, match="codebook_transform_fn"):
        vq(torch.randn(2, 5, 8), codebook_transform_fn=lambda codes: codes)


def test_docs_table_is_the_parsed_table():
    text = DOCS.read_text()
    for name in CLASSES:
        table = getattr(getattr(compat, name), "keywords", None)
        if table is not None:
            assert keyword_table_markdown(table) in text, f"docs table of {name} is stale"


# ----------------------------------------------------------------------------------------------------------------
# the peer bugs, fixed


@pytest.mark.parametrize("codebook_dim", [None, 8])
def test_residual_vq_accepts_image_fmap(codebook_dim):
    rvq = compat.ResidualVQ(dim=16, codebook_size=32, num_quantizers=3, codebook_dim=codebook_dim,
                            accept_image_fmap=True)
    x = torch.randn(2, 16, 5, 6)
    quantized, indices, losses = rvq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 5, 6, 3) and losses.shape == (3,)
    flat = copy.deepcopy(rvq)  # the same stack on the channels-last sequence gives the same answer
    flat.accept_image_fmap = False
    rvq.eval(), flat.eval()
    q_img, i_img, _ = rvq(x)
    q_seq, i_seq, _ = flat(x.movedim(1, -1))
    assert torch.equal(i_img, i_seq)
    torch.testing.assert_close(q_img, q_seq.movedim(-1, 1))
    torch.testing.assert_close(rvq.get_output_from_indices(i_img), q_img)


def test_image_fmap_with_projection_decodes_like_forward():
    """The peer's get_output_from_indices raises here (project_out meets channel-first codes)."""
    vq = compat.VectorQuantize(dim=16, codebook_size=16, codebook_dim=4, accept_image_fmap=True).eval()
    quantized, indices, _ = vq(torch.randn(2, 16, 4, 5))
    assert torch.equal(vq.get_output_from_indices(indices), quantized)


def test_mask_with_projection_equals_the_truncated_batch():
    """mask + codebook_dim != dim crashes in the peer; here the masked batch trains exactly like the truncated one."""
    vq = compat.VectorQuantize(dim=32, codebook_size=16, codebook_dim=8, rotation_trick=False)
    twin = copy.deepcopy(vq)
    x = torch.randn(1, 40, 32)
    mask = torch.arange(40)[None] < 25
    q, indices, loss = vq(x, mask=mask)
    q_t, indices_t, loss_t = twin(x[:, :25])
    assert torch.equal(indices[:, :25], indices_t) and (indices[:, 25:] == -1).all()
    torch.testing.assert_close(q[:, :25], q_t)
    assert (q[:, 25:] == 0).all()
    torch.testing.assert_close(loss, loss_t)
    torch.testing.assert_close(vq.codebook, twin.codebook)  # padding never reached the EMA
    q_lens, _, _ = copy.deepcopy(twin)(x, lens=torch.tensor([25]))
    assert (q_lens[:, 25:] == 0).all()


@pytest.mark.parametrize("name,options", [
    ("VectorQuantize", dict(dim=16, codebook_size=32)),
    ("VectorQuantize", dict(dim=16, codebook_size=32, codebook_dim=4, heads=2, threshold_ema_dead_code=2)),
    ("VectorQuantize", dict(dim=16, codebook_size=32, use_cosine_sim=True, heads=2, codebook_dim=8,
                            separate_codebook_per_head=True)),
    ("ResidualVQ", dict(dim=16, codebook_size=32, num_quantizers=3, codebook_dim=8, quantize_dropout=True)),
], ids=["vq", "vq_heads_revival", "vq_cosine_separate", "rvq_dropout"])
def test_training_indices_decode_to_the_training_output(name, options):
    """The peer's issue #224: after a training step, get_output_from_indices(indices) is what forward returned."""
    module = getattr(compat, name)(**options).train()
    x = torch.randn(2, 30, 16, requires_grad=True)
    for _ in range(2):
        quantized, indices, loss = module(x)
        assert torch.equal(module.get_output_from_indices(indices), quantized)
    (quantized.square().sum() + loss.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if module.has_projections:
        assert module.project_in.weight.grad.abs().sum() > 0 and module.project_out.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# per-call options and the rest of the surface


def test_per_call_options_apply_once():
    vq = compat.VectorQuantize(dim=8, codebook_size=16, stochastic_sample_codes=True, sample_codebook_temp=1.0)
    vq(torch.randn(2, 10, 8), sample_codebook_temp=0.0)
    assert vq.quantizers[0].sampling.temperature == 1.0
    lfq = compat.LFQ(dim=6)
    x = torch.randn(2, 40, 6)
    assert not torch.equal(lfq(x, inv_temperature=100.0)[2], lfq(x, inv_temperature=1.0)[2])
    assert all(q.entropy.temperature == 0.01 for q in lfq.core.quantizers)  # one LFQ per codebook


def test_loss_breakdowns_and_optional_indices():
    vq = compat.VectorQuantize(dim=8, codebook_size=16, commitment_weight=0.5)
    quantized, indices, loss, breakdown = vq(torch.randn(2, 10, 8), return_loss_breakdown=True)
    torch.testing.assert_close(breakdown.commitment * 0.5, loss)
    lfq = compat.LFQ(dim=6, commitment_loss_weight=0.25)
    ret, parts = lfq(torch.randn(2, 40, 6), return_loss_breakdown=True)
    torch.testing.assert_close(ret.entropy_aux_loss, 0.1 * (parts.per_sample_entropy - parts.batch_entropy)
                               + 0.25 * parts.commitment)
    quantized, indices = compat.FSQ(levels=[5, 5], return_indices=False)(torch.randn(2, 10, 2))
    assert indices is None


@pytest.mark.parametrize("options", [dict(), dict(heads=2, codebook_dim=8),
                                     dict(heads=2, codebook_dim=8, separate_codebook_per_head=True),
                                     dict(use_cosine_sim=True)], ids=lambda o: ",".join(o) or "default")
def test_cross_entropy_of_given_indices_matches_peer(options):
    p, a = _pair("VectorQuantize", dim=16, codebook_size=32, **options)
    x = torch.randn(2, 10, 16)
    indices = torch.randint(0, 32, (2, 10, 2) if "heads" in options else (2, 10))
    torch.testing.assert_close(a(x, indices=indices)[1], p(x, indices=indices)[1], atol=1e-5, rtol=1e-5)

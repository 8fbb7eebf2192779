"""ResidualQuantizer's options (quantkit/quantizers/residual.py, issue 17 part C): per-depth codebook sizes,
quant_grad_frac, beam search over residual paths, and ``stepping`` (a frozen codebook). Each test states one
invariant; the beam search is checked against a float64 exhaustive search, the gradient against its closed form."""
import itertools

import pytest
import torch

from quantkit.quantizers import CodebookStep, EMAConfig, ResidualQuantizer
from quantkit.quantizers import residual as residual_module
from quantkit.quantizers.residual import BeamSearch, ImplicitCodebook
from quantkit.testing import check_quantizer

CONFIGS = [
    dict(codebook_sizes=(16, 8, 4)),
    dict(codebook_size=16, quant_grad_frac=0.5),
    dict(codebook_sizes=(16, 8, 4), beam=BeamSearch(3, eval_width=5, level_weights=(1.0, 2.0, 0.5))),
    dict(codebook_size=16, metric="cosine", beam=BeamSearch(4), layer_scale=0.5),
    dict(codebook_size=8, ema=None, implicit_codebook=ImplicitCodebook(hidden=8, blocks=1)),
    dict(codebook_size=16, ema=None, diveq=1e-3),
]


def _rq(**kw):
    return ResidualQuantizer(8, "vq", depth=3, **kw)


@pytest.mark.parametrize("kw", CONFIGS, ids=["sizes", "grad_frac", "beam_sizes_weights", "beam_cosine_scale",
                                                 "qinco", "diveq"])
def test_check_quantizer_contract(kw):
    check_quantizer(_rq(**kw), make=lambda: _rq(**kw))


def test_per_depth_codebook_sizes_bound_each_column_and_refuse_out_of_range_indices():
    q = _rq(codebook_sizes=(16, 8, 4))
    assert [q.layer(d).codebook_size for d in range(3)] == [16, 8, 4] and q.codebook_size == 16
    idx = q.encode(torch.randn(300, 8) * 3)
    assert all(int(idx[:, d].max()) < k for d, k in enumerate((16, 8, 4)))
    with pytest.raises(ValueError, match="codebook_sizes"):
        q.decode(torch.tensor([[0, 0, 4]]))
    for bad, match in [(dict(codebook_sizes=(16, 8)), "codebook_sizes"),
                       (dict(codebook_sizes=(16, 8, 4), codebook_size=16), "not both"),
                       (dict(codebook_sizes=(16, 8, 4), shared_codebook=True), "shared"),
                       (dict(codebook_size=16, quant_grad_frac=1.5), "quant_grad_frac"),
                       (dict(codebook_size=16, beam=BeamSearch(2, level_weights=(1.0,))), "level_weights")]:
        with pytest.raises(ValueError, match=match):
            _rq(**bad)
    with pytest.raises(ValueError, match="top-k"):
        ResidualQuantizer(3, "fsq", depth=2, levels=(5, 4, 3), beam=BeamSearch(2))
    with pytest.raises(ValueError, match="width"):
        BeamSearch(0)


def _float64_exhaustive(q: ResidualQuantizer, x: torch.Tensor, weights=(1.0, 1.0)) -> torch.Tensor:
    """Best (i, j) of a depth-2 stack by the beam score, over all K0 x K1 pairs, in float64 -> (N, 2)."""
    c0 = q.layer(0).codebook.weight.double()
    c1 = q.layer(1).codebook.weight.double()
    xd = x.double()
    best = []
    for row in xd:
        scores = {}
        for i, j in itertools.product(range(c0.shape[0]), range(c1.shape[0])):
            r1 = row - c0[i]
            scores[(i, j)] = weights[0] * r1.square().mean() + weights[1] * (r1 - c1[j]).square().mean()
        best.append(min(scores, key=scores.get))
    return torch.tensor(best)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.2, 3.0)])
def test_full_width_beam_over_two_depths_is_the_float64_exhaustive_search(weights):
    torch.manual_seed(0)
    q = ResidualQuantizer(4, "vq", depth=2, codebook_sizes=(6, 5), beam=BeamSearch(6, level_weights=weights)).eval()
    x = torch.randn(40, 4)
    assert torch.equal(q.encode(x), _float64_exhaustive(q, x, weights))
    assert torch.equal(q(x).indices, q.encode(x))


def test_width_one_is_the_greedy_stack_and_wider_beams_quantize_better_on_average():
    torch.manual_seed(0)
    greedy = _rq(codebook_size=16).eval()
    x = torch.randn(400, 8)
    errors = []
    for width in (1, 2, 8):
        q = _rq(codebook_size=16, beam=BeamSearch(width)).eval()
        q.load_state_dict(greedy.state_dict())
        out = q(x)
        if width == 1:
            assert torch.equal(out.indices, greedy(x).indices)
        torch.testing.assert_close(q.decode(out.indices), out.quantized)
        errors.append(float((out.quantized - x).square().mean()))
    assert errors[2] < errors[0]


def test_beam_training_updates_each_codebook_with_the_chosen_path():
    torch.manual_seed(0)
    q = _rq(codebook_size=16, beam=BeamSearch(4), ema=EMAConfig(decay=0.5))
    reference = _rq(codebook_size=16, ema=EMAConfig(decay=0.5))
    reference.load_state_dict(q.state_dict())
    before = [q.layer(d).codebook.weight.clone() for d in range(3)]
    x = torch.randn(200, 8)
    paths = q.eval().encode(x)  # the search, before any update
    out = q.train()(x)
    assert torch.equal(out.indices, paths)
    residual = x  # each level's EMA step takes the residual along the chosen path and the chosen codes
    for d in range(3):
        reference.layer(d).codebook.update(residual, paths[:, d])
        residual = residual - before[d][paths[:, d]]
    for d in range(3):
        torch.testing.assert_close(q.layer(d).codebook.weight, reference.layer(d).codebook.weight)


@pytest.mark.parametrize("f", [0.0, 0.25, 1.0])
def test_quant_grad_frac_gradient_is_the_closed_form_sum(f):
    """Straight-through levels: d out / d x = sum_d (1 - f)^d I (each residual keeps (1 - f) of the previous)."""
    q = _rq(codebook_size=16, quant_grad_frac=f).train()
    x = torch.randn(30, 8, requires_grad=True)
    q(x).quantized.sum().backward()
    expected = sum((1 - f) ** d for d in range(3))
    torch.testing.assert_close(x.grad, torch.full_like(x, expected))


def test_stepping_frozen_leaves_every_level_unchanged_and_is_restored():
    q = _rq(codebook_size=16).train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with q.stepping(CodebookStep(frozen=True)):
        q(torch.randn(100, 8))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    q(torch.randn(100, 8))
    assert not torch.equal(before["layers.0.codebook.weight"], q.layers[0].codebook.weight)
    with pytest.raises(ValueError, match="Codebook"):
        with ResidualQuantizer(3, "fsq", depth=2, levels=(5, 4, 3)).stepping(CodebookStep(frozen=True)):
            pass


# ---------------------------------------------------------------------------------------------------------------
# QINCo (ImplicitCodebook)


def _qinco(**kw):
    torch.manual_seed(0)
    return ResidualQuantizer(4, "vq", depth=3, codebook_sizes=(8, 6, 5), ema=None,
                             implicit_codebook=ImplicitCodebook(hidden=8, blocks=2), **kw).eval()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_qinco_indices_are_the_float64_nearest_conditioned_codes(metric):
    q = _qinco(metric=metric).double()
    x = torch.randn(30, 4, dtype=torch.float64)
    idx = q.encode(x)
    total, residual = torch.zeros_like(x), x.clone()
    for d in range(3):
        base = q.layer(d).codebook.lookup(torch.arange(q.codebook_sizes[d]))  # (K, 4)
        if d == 0:
            codes = base.expand(30, -1, -1)
        else:  # every vector's own codebook: f_d(partial sum, c_k) for all k
            codes = torch.stack([q.mlps[d - 1](total, base[k].expand(30, -1)) for k in range(base.shape[0])], 1)
        if metric == "cosine":
            score = -(torch.nn.functional.normalize(residual, dim=-1)[:, None] * codes).sum(-1)
        else:
            score = (residual[:, None] - codes).square().sum(-1)
        assert torch.equal(idx[:, d], score.argmin(1)), d
        chosen = codes[torch.arange(30), idx[:, d]]
        residual, total = residual - chosen, total + chosen
    torch.testing.assert_close(q.decode(idx), total)
    torch.testing.assert_close(q.decode_levels(idx).sum(0), total)
    assert torch.equal(q(x).indices, idx)


def test_qinco_search_in_small_chunks_gives_the_same_indices(monkeypatch):
    q, x = _qinco(), torch.randn(50, 4)
    whole = q.encode(x)
    monkeypatch.setattr(residual_module, "_IMPLICIT_CHUNK_ELEMENTS", 1)  # one vector per chunk
    assert torch.equal(q.encode(x), whole)


def test_qinco_trains_the_codebooks_and_mlps_by_gradient():
    q = _qinco().train()
    out = q(torch.randn(40, 4))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.mlps.parameters())
    assert all(q.layer(d).codebook.weight.grad.abs().sum() > 0 for d in range(3))


@pytest.mark.parametrize("kw,match", [(dict(codebook_size=8), "ema=None"),
                                      (dict(codebook_size=8, ema=None, beam=BeamSearch(2)), "beam"),
                                      (dict(codebook_size=8, ema=None, codebook_dim=2), "projection")])
def test_qinco_refuses_what_it_cannot_do(kw, match):
    with pytest.raises(ValueError, match=match):
        ResidualQuantizer(4, "vq", depth=2, implicit_codebook=ImplicitCodebook(), **kw)
    with pytest.raises(ValueError, match="blocks"):
        ImplicitCodebook(blocks=-1)


# ---------------------------------------------------------------------------------------------------------------
# DiVeQ over the stack


def test_stack_diveq_without_noise_outputs_the_code_sum_and_trains_every_codebook():
    torch.manual_seed(0)
    q = _rq(codebook_size=16, ema=None, diveq=0.0).double().train()
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    out = q(x)
    torch.testing.assert_close(out.quantized, q.decode(out.indices))
    g = torch.randn(20, 8, dtype=torch.float64)
    (out.quantized * g).sum().backward()
    u = torch.nn.functional.normalize(out.quantized.detach() - x.detach(), dim=-1)  # the error direction
    torch.testing.assert_close(x.grad, g - u * (u * g).sum(-1, keepdim=True))  # DiVeQ's closed form
    assert all(q.layer(d).codebook.weight.grad.abs().sum() > 0 for d in range(3))
    with pytest.raises(ValueError, match="gradient-trained"):
        _rq(codebook_size=16, diveq=1e-3)
    with pytest.raises(ValueError, match="quant_grad_frac"):
        _rq(codebook_size=16, ema=None, diveq=1e-3, quant_grad_frac=0.5)

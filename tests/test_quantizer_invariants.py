"""The Quantizer contract, proved for every registered quantizer (timm-style: generated from ``list_quantizers()``,
so a quantizer is tested the day it is registered).

Each test states one invariant and runs the matching ``quantkit.testing`` check on the registered example, after one
training step (so k-means init and EMA state are live), over inputs hypothesis draws: shapes, layouts, dtypes,
scales, clustered and repeated vectors, masks. ``test_check_quantizer_passes_on_a_fresh_instance`` runs the whole
``check_quantizer`` on an untrained instance, as a user would on their own subclass.
"""
from __future__ import annotations

import functools
import inspect
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantkit.quantizers  # noqa: F401 - registers every built-in quantizer
from quantkit import testing
from quantkit.metrics import CodebookUsage
from quantkit.quantizers import (DeadCodeConfig, KMeansInit, Quantizer, Sampling, create_quantizer, example_kwargs,
                                 list_quantizers)
from quantkit.quantizers._registry import quantizer_class

NAMES = list_quantizers()
#: torch.compile costs seconds per quantizer on a CPU: inductor (code generation too) for these, aot_eager (graph
#: capture with fullgraph, fake kernels, functionalization) for the rest; QUANTKIT_TEST_COMPILE_BACKEND=inductor
#: compiles every quantizer with inductor.
INDUCTOR_NAMES = {"vq", "fsq", "lfq"}
COMPILE_BACKEND = os.getenv("QUANTKIT_TEST_COMPILE_BACKEND")

#: (name, test) -> (condition, reason), for a registered quantizer that violates an invariant and is not fixed yet:
#: xfail strict, so the fix is noticed.
KNOWN_VIOLATIONS: dict[tuple[str, str], tuple[bool, str]] = {}


def _violated(name: str, test: str) -> bool:
    return KNOWN_VIOLATIONS.get((name, test), (False, ""))[0]


def _names(test: str) -> list:
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_VIOLATIONS[(n, test)][1]))
            if _violated(n, test) else n for n in NAMES]


def _examples(n: int):
    """At most n hypothesis examples (fewer when the profile asks for fewer)."""
    return settings(max_examples=min(n, settings.default.max_examples))


def _takes_channel_first(name: str) -> bool:
    return "channel_first" in inspect.signature(quantizer_class(name)).parameters


def _make(name: str, channel_first: bool = False) -> Quantizer:
    kwargs = example_kwargs(name)
    if channel_first:
        kwargs["channel_first"] = True
    return create_quantizer(name, **kwargs)


@functools.cache
def _trained(name: str, channel_first: bool = False) -> Quantizer:
    """The registered example after one training step on a batch of at least 4x codebook_size vectors. Shared by
    the tests and never changed: every check works on a deep copy."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        q = _make(name, channel_first)
        x = testing.example_input(q, batch=4, length=max(16, q.codebook_size), seed=1)
        with torch.no_grad():
            q.train()(x)
    return q.eval()


def _quantizer_and_input(data, name: str, dtypes=(torch.float32,), min_vectors: int = 1, **kwargs):
    """Draws a layout (where the quantizer takes one), then an input for it."""
    channel_first = _takes_channel_first(name) and data.draw(st.booleans(), label="channel_first")
    q = _trained(name, channel_first)
    return q, data.draw(_inputs(q, dtypes=dtypes, min_vectors=min_vectors, **kwargs), label="x")


def _inputs(q: Quantizer, dtypes=(torch.float32,), min_vectors: int = 1, max_vectors: int = 48):
    if callable(getattr(q, "example_input", None)):
        # Fixed input geometry (whole feature maps): draw the batch, the seed and the scale.
        return st.builds(
            lambda batch, seed, scale, dtype: (q.example_input(batch, torch.Generator().manual_seed(seed))
                                               * scale).to(dtype),
            st.integers(max(1, min_vectors), 3), st.integers(0, 2**31 - 1), st.sampled_from([0.03, 1.0, 30.0]),
            st.sampled_from(dtypes))
    return testing.latents(q.dim, channel_first=q.channel_first, dtypes=dtypes, min_vectors=min_vectors,
                           max_vectors=max_vectors)


# ---------------------------------------------------------------------------------------------------------------
# output contract


@pytest.mark.parametrize("name", _names("output"))
@_examples(10)
@given(data=st.data())
def test_output_has_input_shape_and_dtype_with_int64_indices_in_range(name, data):
    q, x = _quantizer_and_input(data, name, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16))
    testing.check_output_contract(q, x)


@pytest.mark.parametrize("name", _names("stats"))
@_examples(5)
@given(data=st.data())
def test_batch_stats_equal_codebook_usage_of_the_masked_in_indices(name, data):
    q, x = _quantizer_and_input(data, name, min_vectors=2)
    q = testing._copy(q, True)
    mask = testing._default_mask(q, x)
    out = q(x, mask=mask)
    usage = CodebookUsage(q.codebook_size)  # the stats pool every depth / head into one histogram
    usage.update(out.indices[mask])
    report = usage.compute()
    assert math.isclose(float(out.stats["usage"]), float(report.utilization), rel_tol=1e-6)
    assert math.isclose(float(out.stats["perplexity"]), float(report.perplexity), rel_tol=1e-4, abs_tol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# eval


@pytest.mark.parametrize("name", _names("encode"))
@_examples(8)
@given(data=st.data())
def test_eval_encode_gives_the_forward_indices(name, data):
    testing.check_encode_matches_forward(*_quantizer_and_input(data, name))


@pytest.mark.parametrize("name", _names("round_trip"))
@_examples(15)
@given(data=st.data())
def test_eval_decode_round_trips_quantized(name, data):
    testing.check_decode_round_trip(*_quantizer_and_input(data, name))


@pytest.mark.parametrize("name", _names("purity"))
@_examples(8)
@given(data=st.data())
def test_eval_changes_no_parameter_or_buffer(name, data):
    testing.check_eval_purity(*_quantizer_and_input(data, name))


# ---------------------------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("name", _names("gradient"))
@_examples(8)
@given(data=st.data())
def test_gradient_reaches_x_and_is_the_identity_where_declared(name, data):
    testing.check_gradient(*_quantizer_and_input(data, name))


@pytest.mark.parametrize("name", _names("mask"))
@_examples(12)
@given(data=st.data())
def test_masked_out_vectors_change_nothing(name, data):
    q, x = _quantizer_and_input(data, name, min_vectors=2)
    shape = testing._vector_shape(q, x)
    flags = data.draw(st.lists(st.booleans(), min_size=math.prod(shape), max_size=math.prod(shape)), label="mask")
    flags[0] = True  # at least one vector in: the subset forward needs a batch
    testing.check_mask(q, x, torch.tensor(flags).reshape(shape))


@pytest.mark.parametrize("name", _names("fully_masked"))
def test_fully_masked_batch_gives_finite_loss_and_stats(name):
    for channel_first in {False, _takes_channel_first(name)}:
        q = _trained(name, channel_first)
        testing.check_fully_masked_batch(q, testing.example_input(q))
        testing.check_fully_masked_batch(_make(name, channel_first), testing.example_input(q))


# ---------------------------------------------------------------------------------------------------------------
# precision, serialization, layout


@pytest.mark.parametrize("name", _names("low_precision"))
@_examples(8)
@given(data=st.data())
def test_float16_and_bfloat16_inputs_give_the_float32_indices(name, data):
    testing.check_low_precision(*_quantizer_and_input(data, name))


@pytest.mark.parametrize("name", _names("autocast"))
def test_autocast_gives_the_float32_indices(name):
    q = _trained(name)
    # Thousands of vectors: a code choice made in bfloat16 flips some of them (a handful of inputs rarely shows it).
    testing.check_autocast(q, 10 * testing.example_input(q, batch=64, length=128, seed=5))


@pytest.mark.parametrize("name", _names("state_dict"))
@_examples(3)
@given(data=st.data())
def test_state_dict_save_load_gives_identical_indices(name, data):
    q, x = _quantizer_and_input(data, name)
    testing.check_state_dict_round_trip(q, x, make=lambda: _make(name, q.channel_first and _takes_channel_first(name)))


@pytest.mark.parametrize("name", [n for n in _names("layout") if _takes_channel_first(getattr(n, "values", [n])[0])])
@_examples(5)
@given(data=st.data())
def test_channel_first_gives_the_channel_last_outputs(name, data):
    last = _trained(name)
    first = _make(name, channel_first=True)
    first.load_state_dict(last.state_dict())
    first.eval()
    x = data.draw(_inputs(last), label="x")  # channels last
    out_last, out_first = last(x), first(x.movedim(-1, 1))
    assert torch.equal(out_first.indices, out_last.indices)
    assert torch.equal(out_first.quantized, out_last.quantized.movedim(-1, 1))
    assert torch.equal(first.decode(out_first.indices), last.decode(out_last.indices).movedim(-1, 1))


# ---------------------------------------------------------------------------------------------------------------
# bad input, empty batches


@pytest.mark.parametrize("name", _names("bad_input"))
def test_bad_input_raises_value_error_naming_it_and_leaves_every_buffer_unchanged(name):
    for channel_first in {False, _takes_channel_first(name)}:
        for q in (_trained(name, channel_first), _make(name, channel_first)):
            testing.check_bad_input(q, testing.example_input(q))


@pytest.mark.parametrize("name", _names("empty"))
def test_empty_batch_works_or_raises_value_error_naming_x(name):
    for channel_first in {False, _takes_channel_first(name)}:
        for q in (_trained(name, channel_first), _make(name, channel_first)):
            testing.check_empty_batch(q, testing.example_input(q))


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, and the whole check on an untrained instance


@pytest.mark.parametrize("name", _names("compile"))
def test_compiled_eval_forward_matches_eager(name):
    q = _trained(name)
    backend = COMPILE_BACKEND or ("inductor" if name in INDUCTOR_NAMES else "aot_eager")
    testing.check_compile(q, testing.example_input(q, seed=3), backend=backend)


@pytest.mark.parametrize("name", _names("check_quantizer"))
def test_check_quantizer_passes_on_a_fresh_instance(name):
    # A violation already marked on its own test is not counted twice.
    skip = tuple(check for check in testing.CHECKS if _violated(name, check))
    for channel_first in {False, _takes_channel_first(name)}:
        testing.check_quantizer(_make(name, channel_first), make=lambda cf=channel_first: _make(name, cf), skip=skip)


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_check_quantizer_passes_on_cuda_with_inductor(name):
    # The known violations above were measured on the CPU; their checks are left to the CPU tests.
    skip = tuple(check for check in testing.CHECKS if (name, check) in KNOWN_VIOLATIONS)
    q = _make(name).cuda()
    x = testing.example_input(q, batch=4, length=max(16, q.codebook_size), device="cuda")
    testing.check_quantizer(q, x, make=lambda: _make(name).cuda(), compile=True, skip=skip)


# ---------------------------------------------------------------------------------------------------------------
# option variants the registered examples leave out


#: (name, keywords over the registered example, checks skipped because the option makes them inapplicable).
VARIANTS: list[tuple[str, dict, tuple[str, ...]]] = [
    ("vq", dict(heads=2), ()),
    ("vq", dict(codebook_dim=4), ()),
    ("vq", dict(metric="cosine", codebook_dim=4), ()),
    ("vq", dict(ema=None, metric="cosine"), ()),
    ("vq", dict(dead_code=DeadCodeConfig(threshold=1.0)), ()),
    ("vq", dict(kmeans_init=KMeansInit()), ()),
    ("vq", dict(gradient="rotation"), ()),
    # Sampling draws per vector: a batch with masked-out vectors draws other numbers for the rest.
    ("vq", dict(sampling=Sampling()), ("mask",)),
    ("lfq", dict(dim=8), ()),
    ("lfq", dict(dim=8, spherical=True), ()),
    ("lfq", dict(rotation=True, input_clamp=1.5, entropy=dict(softplus_offset=5.0)), ()),
    ("fsq", dict(dim=6), ()),
    ("softvq", dict(metric="l2", learnable_temperature=True), ()),
    ("residual", dict(dim=8, quantizer="vq", codebook_size=16, levels=None, layer_scale=None), ()),
    ("residual", dict(dim=8, quantizer="vq", codebook_size=16, levels=None, layer_scale=None, shared_codebook=True,
                      quantize_dropout=0.5), ()),
    ("residual", dict(dim=8, quantizer="lfq", codebook_size=16, levels=None, layer_scale=0.5), ()),
    ("residual", dict(commitment_weight=0.5), ()),
    ("fsq", dict(grid="symmetric", bound="clamp"), ()),
    ("fsq", dict(grid="symmetric", levels=(2, 3, 4)), ()),
    ("fsq", dict(rotation=True, dim=5), ()),
    ("fsq", dict(grid="symmetric", noise_dropout=0.5, noise_mode="code"), ()),
    ("residual", dict(grid="symmetric", bound="clamp", layer_scale=(0.2, 0.25, 1 / 3), input_clamp=(1.25, 4 / 3, 1.5)),
     ()),
]

#: (variant id, check) -> reason: a violation not fixed yet; the variant test skips the check and
#: test_variant_known_violation_still_fails keeps it visible (xfail strict).
VARIANT_VIOLATIONS: dict[tuple[str, str], str] = {
}


def _variant_id(name: str, overrides: dict) -> str:
    return "-".join([name, *overrides])


def _variant_kwargs(name: str, overrides: dict) -> dict:
    kwargs = {**example_kwargs(name), **overrides}
    return {k: v for k, v in kwargs.items() if v is not None or k not in overrides}


# One layout per variant (alternating) keeps the cost down; both layouts are covered above.
_REGISTERED_VARIANTS = [pytest.param(name, overrides, skip, i % 2 == 1, id=_variant_id(name, overrides))
                        for i, (name, overrides, skip) in enumerate(VARIANTS) if name in NAMES]


@pytest.mark.parametrize("name, overrides, skip, channel_first", _REGISTERED_VARIANTS)
def test_check_quantizer_passes_on_option_variants(name, overrides, skip, channel_first):
    variant = _variant_id(name, overrides)
    skip = skip + tuple(check for (v, check) in VARIANT_VIOLATIONS if v == variant)
    kwargs = {**_variant_kwargs(name, overrides), "channel_first": channel_first}
    torch.manual_seed(0)
    q = create_quantizer(name, **kwargs)
    x = testing.example_input(q, batch=4, length=12)
    testing.check_quantizer(q, x, make=lambda: create_quantizer(name, **kwargs), skip=skip)


@pytest.mark.parametrize("variant, check", [
    pytest.param(v, c, marks=pytest.mark.xfail(strict=True, reason=reason), id=f"{v}-{c}")
    for (v, c), reason in VARIANT_VIOLATIONS.items()
    if any(_variant_id(n, o) == v for n, o, _ in VARIANTS if n in NAMES)])
def test_variant_known_violation_still_fails(variant, check):
    name, overrides = next((n, o) for n, o, _ in VARIANTS if _variant_id(n, o) == variant)
    torch.manual_seed(0)
    q = create_quantizer(name, **_variant_kwargs(name, overrides))
    x = 10 * testing.example_input(q, batch=16, length=64, seed=5)
    testing.CHECKS[check](q, x)


@pytest.mark.parametrize("make, x", [
    (lambda **kw: quantkit.quantizers.SoftVQ(4, 16, **kw), torch.randn(32, 4)),
    (lambda **kw: quantkit.quantizers.MultiScaleResidualQuantizer(4, 16, patch_nums=(1, 2), **kw),
     torch.randn(3, 4, 2, 2)),
], ids=["softvq", "multiscale_residual"])
def test_revival_state_is_training_only_and_older_checkpoints_load(make, x):
    """Opt-in dead-code revival adds usage/step buffers: eval never touches them, training counts, and a
    checkpoint saved before the buffers existed still loads."""
    q = make(dead_code=quantkit.quantizers.DeadCodeConfig())
    q.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(x)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    q.train()
    q(x)
    assert int(q.steps) == 1 and float(q.usage.sum()) != 16.0
    state = {k: v for k, v in q.state_dict().items() if k not in ("usage", "steps")}
    fresh = make()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.codebook, q.codebook) and int(fresh.steps) == 0

"""quantkit.testing can fail: check_quantizer accepts a correct toy quantizer and rejects each deliberately broken one
with the invariant it breaks; the strategies draw what they promise."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from quantkit import testing
from quantkit.quantizers import Quantizer, create_quantizer, example_kwargs, list_quantizers
from quantkit.quantizers._registry import quantizer_class
from quantkit.quantizers.gradients import straight_through
from quantkit.ops import nearest_codeword


class ToyVQ(Quantizer):
    """A correct nearest-codeword quantizer with a usage-count buffer updated in training (masked rows excluded)."""

    identity_gradient = True

    def __init__(self, dim: int = 3, codebook_size: int = 5, channel_first: bool = False):
        super().__init__(dim, codebook_size, channel_first)
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim))
        self.register_buffer("hits", torch.zeros(codebook_size))

    def _encode(self, z: Tensor) -> Tensor:  # (N, dim) -> (N,)
        return nearest_codeword(z, self.codebook.detach()).indices

    def _decode(self, indices: Tensor) -> Tensor:
        return self.codebook[indices]

    def _quantize(self, z, mask):
        indices = self._encode(z.detach())
        codes = self._decode(indices)
        keep = torch.ones_like(indices, dtype=torch.bool) if mask is None else mask
        if self.training:
            with torch.no_grad():
                self.hits.index_add_(0, indices[keep], torch.ones_like(indices[keep], dtype=self.hits.dtype))
        err = ((codes - z.detach()) ** 2).sum(-1)[keep]  # codebook loss on kept rows only
        loss = err.sum() / keep.sum().clamp_min(1)
        return straight_through(z, codes), indices, loss


def test_check_quantizer_accepts_a_correct_quantizer_and_leaves_it_and_the_rng_unchanged():
    q, q_cf = ToyVQ(), ToyVQ(channel_first=True)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    testing.check_quantizer(q, make=ToyVQ, compile=True, compile_backend="aot_eager")
    testing.check_quantizer(q_cf, make=lambda: ToyVQ(channel_first=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in state.items()) and q.training


# ---------------------------------------------------------------------------------------------------------------
# broken quantizers: each breaks one invariant


class Int32Indices(ToyVQ):
    def _quantize(self, z, mask):
        quantized, indices, loss = super()._quantize(z, mask)
        return quantized, indices.int(), loss


class WrongOutputDtype(ToyVQ):
    def forward(self, x, mask=None):
        out = super().forward(x, mask)
        return out._replace(quantized=out.quantized.double())


class MissingUsageStat(ToyVQ):
    def forward(self, x, mask=None):
        out = super().forward(x, mask)
        return out._replace(stats={"perplexity": out.stats["perplexity"]})


class OutOfRangeIndices(ToyVQ):
    def forward(self, x, mask=None):
        out = super().forward(x, mask)
        return out._replace(indices=out.indices + self.codebook_size)


class CrashesOnValidInput(ToyVQ):
    def _quantize(self, z, mask):
        quantized, indices, loss = super()._quantize(z, mask)
        return quantized, indices + self.codebook_size, loss  # the base's usage stats index out of range


class EvalMutatesBuffer(ToyVQ):
    def _quantize(self, z, mask):
        out = super()._quantize(z, mask)
        if not self.training:
            self.hits.add_(1)
        return out


class EvalFlipsFlag(ToyVQ):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initted = False

    def _quantize(self, z, mask):
        self.initted = True  # a Python flag flipped by any forward, eval included
        return super()._quantize(z, mask)


class DecodeDrifts(ToyVQ):
    def decode(self, indices):
        return super().decode(indices) + 1e-3


class EncodeDisagrees(ToyVQ):
    def _encode(self, z):
        indices = super()._encode(z)
        return indices if torch.is_grad_enabled() else (indices + 1) % self.codebook_size


class MaskLeaksIntoBuffer(ToyVQ):
    def _quantize(self, z, mask):
        return super()._quantize(z, None)  # counts and loss use every row


class MaskLeaksIntoLossGradient(ToyVQ):
    def _quantize(self, z, mask):
        quantized, indices, loss = super()._quantize(z, mask)
        return quantized, indices, loss + (z - z.detach()).sum()  # value unchanged, gradient reaches masked rows


class FullyMaskedNaN(ToyVQ):
    def _quantize(self, z, mask):
        quantized, indices, _ = super()._quantize(z, mask)
        keep = torch.ones_like(indices, dtype=torch.bool) if mask is None else mask
        return quantized, indices, ((quantized.detach() - z) ** 2).sum(-1)[keep].sum() / keep.sum()


class HalfGradient(ToyVQ):
    def _quantize(self, z, mask):
        quantized, indices, loss = super()._quantize(z, mask)
        return straight_through(0.5 * z, quantized), indices, loss  # claims identity_gradient


class NoGradient(ToyVQ):
    def _quantize(self, z, mask):
        quantized, indices, loss = super()._quantize(z, mask)
        return quantized.detach(), indices, loss


class CodebookNotSaved(ToyVQ):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        codebook = self.codebook.detach().clone()
        del self.codebook
        self.register_buffer("codebook", codebook, persistent=False)


class ComputesInInputDtype(ToyVQ):
    def forward(self, x, mask=None):
        out = super().forward(x.float(), mask)
        if x.dtype in (torch.float16, torch.bfloat16):  # as if the search ran in x's precision: a different choice
            out = out._replace(indices=(out.indices + 1) % self.codebook_size)
        return out._replace(quantized=out.quantized.to(x.dtype))


class AutocastSearch(ToyVQ):
    """Searches in reduced precision whenever its caller runs under autocast (the base class turns autocast off
    inside _quantize, so this one remembers the caller's state)."""

    _caller_autocast = False

    def forward(self, x, mask=None):
        self._caller_autocast = torch.is_autocast_enabled(x.device.type)
        return super().forward(x, mask)

    def _encode(self, z):
        distances = torch.cdist(z, self.codebook.detach())
        if self._caller_autocast:
            distances = -distances  # stands in for a reduced-precision choice
        return distances.argmin(-1)


class CountsBeforeValidating(ToyVQ):
    def forward(self, x, mask=None):
        self.hits.add_(1)  # state changes before the input is checked
        return super().forward(x, mask)


class AcceptsNaN(ToyVQ):
    def _to_rows(self, x, name="x"):
        return super()._to_rows(torch.nan_to_num(x) if isinstance(x, Tensor) and x.is_floating_point() else x, name)


class TypeErrorOnIntegers(ToyVQ):
    def _to_rows(self, x, name="x"):
        if isinstance(x, Tensor) and not x.is_floating_point():
            raise TypeError("no")
        return super()._to_rows(x, name)


class EmptyBatchCrashes(ToyVQ):
    def _quantize(self, z, mask):
        out = super()._quantize(z, mask)
        _ = z[0]  # IndexError on an empty batch
        return out


class GraphBreak(ToyVQ):
    def _quantize(self, z, mask):
        quantized, indices, loss = super()._quantize(z, mask)
        torch._dynamo.graph_break()
        return quantized, indices, loss


BROKEN = [
    (Int32Indices, "output_contract", "indices have dtype torch.int32"),
    (WrongOutputDtype, "output_contract", "quantized has dtype torch.float64"),
    (MissingUsageStat, "output_contract", "stats has no 'usage'"),
    (OutOfRangeIndices, "output_contract", r"outside \[0, 5\)"),
    (CrashesOnValidInput, "output_contract", "output contract: raised IndexError on a valid call"),
    (EvalMutatesBuffer, "eval_purity", "eval changes no parameter or buffer: 'hits' changed"),
    (EvalFlipsFlag, "eval_purity", "'initted' changed from False to True"),
    (DecodeDrifts, "decode_round_trip", r"decode\(q\(x\).indices\) == q\(x\).quantized"),
    (EncodeDisagrees, "encode_matches_forward", r"encode\(x\) == forward\(x\).indices"),
    (MaskLeaksIntoBuffer, "mask", "masked-out vectors change nothing"),
    (MaskLeaksIntoLossGradient, "mask", "the loss sends a gradient to masked-out vectors"),
    (FullyMaskedNaN, "fully_masked_batch", "loss is nan"),
    (HalfGradient, "gradient", "straight-through gradient equals identity"),
    (NoGradient, "gradient", "no gradient reaches x"),
    (CodebookNotSaved, "state_dict_round_trip", "state_dict save/load gives identical indices"),
    (ComputesInInputDtype, "low_precision", "float16 input gives the float32 indices"),
    (AutocastSearch, "autocast", r"autocast\(bfloat16\) gives the float32 indices"),
    (CountsBeforeValidating, "bad_input", "bad input leaves every buffer unchanged"),
    (AcceptsNaN, "bad_input", "x containing nan: no error raised"),
    (TypeErrorOnIntegers, "bad_input", "integer x: raised TypeError instead of ValueError"),
    (EmptyBatchCrashes, "empty_batch", "raised IndexError instead of ValueError"),
    (GraphBreak, "compile", r"torch.compile\(fullgraph=True"),
]


@pytest.mark.parametrize("cls, check, message", BROKEN, ids=[c.__name__ for c, _, _ in BROKEN])
def test_check_rejects_a_broken_quantizer_naming_the_invariant(cls, check, message):
    q = cls()
    x = testing.example_input(q)
    kwargs = {"make": cls} if check == "state_dict_round_trip" else {}
    if check == "compile":
        kwargs = {"backend": "eager"}
    with pytest.raises(AssertionError, match=message):
        testing.CHECKS[check](q, x, **kwargs)
    with pytest.raises(AssertionError, match=f"^{cls.__name__}: "):  # and so does check_quantizer, naming q
        testing.check_quantizer(q, x, make=cls, compile=check == "compile", compile_backend="eager")


def test_the_correct_toy_passes_every_check_the_broken_ones_fail():
    q = ToyVQ()
    x = testing.example_input(q)
    for check in {check for _, check, _ in BROKEN} - {"compile"}:
        kwargs = {"make": ToyVQ} if check == "state_dict_round_trip" else {}
        testing.CHECKS[check](q, x, **kwargs)


def test_check_quantizer_rejects_non_quantizers_and_unknown_skips():
    with pytest.raises(TypeError, match="quantkit.Quantizer"):
        testing.check_quantizer(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown checks"):
        testing.check_quantizer(ToyVQ(), skip=("nope",))


def test_a_violation_names_a_users_subclass_of_a_registered_quantizer_by_its_class():
    if "fsq" not in list_quantizers():
        pytest.skip("fsq is not registered")

    class MyFSQ(quantizer_class("fsq")):
        def decode(self, indices):
            return super().decode(indices) + 1

    q = MyFSQ(**example_kwargs("fsq"))
    with pytest.raises(AssertionError, match=r"^MyFSQ: eval decode"):
        testing.check_decode_round_trip(q, testing.example_input(q))


def test_a_quantizer_with_its_own_input_geometry_supplies_example_input():
    class MapQuantizer(ToyVQ):
        def example_input(self, batch, generator):
            return torch.randn(batch, 7, self.dim, generator=generator)

    assert testing.example_input(MapQuantizer(), batch=3).shape == (3, 7, 3)


# ---------------------------------------------------------------------------------------------------------------
# strategies


@given(st.data())
def test_latents_draw_finite_tensors_of_the_promised_layout(data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    channel_first = data.draw(st.booleans())
    x = data.draw(testing.latents(5, channel_first=channel_first, dtypes=(dtype,), max_vectors=40))
    assert x.dtype == dtype and bool(torch.isfinite(x).all())
    assert (x.shape[1] if channel_first else x.shape[-1]) == 5
    vectors = x.numel() // 5
    assert 1 <= vectors <= 40 * 8  # the first leading dim may be raised to reach min_vectors, never beyond 8x


@given(st.data())
def test_latents_can_draw_empty_batches(data):
    x = data.draw(testing.latents(2, min_vectors=0, max_vectors=4))
    assert x.shape[-1] == 2


@pytest.mark.skipif(not list_quantizers(), reason="no quantizer registered")
@given(testing.registered_quantizers())
def test_registered_quantizer_configs_build(name_and_kwargs):
    name, kwargs = name_and_kwargs
    q = create_quantizer(name, **kwargs)
    assert isinstance(q, Quantizer) and q.registry_name == name


def test_quantizer_configs_draw_overrides():
    from hypothesis import find

    name = "fsq" if "fsq" in list_quantizers() else None
    if name is None:
        pytest.skip("fsq is not registered")
    found = find(testing.quantizer_configs(name, channel_first=False, levels=st.sampled_from([(3, 3, 3), (8, 5, 5)])),
                 lambda kw: kw["levels"] == (8, 5, 5))
    assert found["channel_first"] is False and found["dim"] == 3

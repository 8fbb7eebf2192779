"""ThinLinear: nn.Linear's values and gradients, computed with thin-GEMM-friendly backward products."""
import pytest
import torch
from torch import nn

from quantkit.quantizers import projection
from quantkit.quantizers.base import all_finite
from quantkit.quantizers.projection import ThinLinear, projections


@pytest.fixture(params=["thin", "small"])
def path(request, monkeypatch):
    """Runs a test through the reoriented backward (threshold 0) and through nn.Linear's kernels (small inputs)."""
    monkeypatch.setattr(projection, "_MIN_THIN_ELEMENTS", 0 if request.param == "thin" else 1 << 40)
    return request.param


@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (4, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_thin_linear_matches_nn_linear_values_and_gradients_float64(shape, bias, path):
    torch.manual_seed(0)
    thin = ThinLinear(*shape, bias=bias).double()
    ref = nn.Linear(*shape, bias=bias).double()
    ref.load_state_dict(thin.state_dict())  # same parameters, same state_dict keys
    x = torch.randn(2, 5, shape[0], dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, shape[1], dtype=torch.float64)
    out, out_ref = thin(x), ref(x)
    torch.testing.assert_close(out, out_ref)
    grads = torch.autograd.grad((out * g).sum(), [x, *thin.parameters()])
    grads_ref = torch.autograd.grad((out_ref * g).sum(), [x, *ref.parameters()])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_thin_linear_gradcheck(path):
    thin = ThinLinear(6, 2).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, w, b: thin(x_), (x, thin.weight, thin.bias))


def test_projections_are_identities_when_sizes_agree():
    p_in, p_out = projections(5, 5)
    assert isinstance(p_in, nn.Identity) and isinstance(p_out, nn.Identity)
    p_in, p_out = projections(8, 3, bias=False)
    assert (p_in.in_features, p_in.out_features, p_in.bias) == (8, 3, None)
    assert (p_out.in_features, p_out.out_features) == (3, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_exact_including_overflowing_sums(dtype):
    big = torch.finfo(dtype).max
    x = torch.full((64,), big, dtype=dtype)  # every element finite, the sum overflows
    assert all_finite(x)
    assert all_finite(x[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[17] = bad
        assert not all_finite(y)
    z = torch.zeros(3, dtype=dtype)
    z[0], z[1] = float("inf"), -float("inf")  # inf - inf: the sum is NaN, still caught
    assert not all_finite(z)

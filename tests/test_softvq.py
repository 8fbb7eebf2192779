"""SoftVQ: the soft output and its gradients equal a float64 brute-force softmax; indices are the most probable codes
and decode returns them; the Quantizer contract (soft variant)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from quantkit import SoftVQ, create_quantizer
from quantkit.quantizers import DeadCodeConfig
from quantkit.testing import check_quantizer, utilization_after_training


def _brute(z, codebook, log_t, metric):
    """float64 reference: (softmax(logits) @ codes, probabilities)."""
    if metric == "cosine":
        z = torch.nn.functional.normalize(z, dim=-1)
        codebook = torch.nn.functional.normalize(codebook, dim=-1)
        logits = z @ codebook.T / log_t.exp()
    else:
        logits = -torch.cdist(z, codebook).square() / log_t.exp()
    p = torch.softmax(logits, dim=-1)
    return p @ codebook, p


@settings(max_examples=30)
@given(st.sampled_from(["l2", "cosine"]), st.integers(1, 8), st.integers(1, 40), st.sampled_from([0.07, 0.5, 2.0]),
       st.integers(0, 2 ** 31 - 1))
def test_soft_output_and_gradients_match_float64_brute_force(metric, dim, size, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    q = SoftVQ(dim, size, metric=metric, temperature=temperature, learnable_temperature=True)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(size, dim, generator=gen))
    z = torch.randn(13, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(13, dim, generator=gen, dtype=torch.float64)
    out = q(z)
    grads = torch.autograd.grad(out.quantized, (z, q.codebook, q.log_temperature), g)
    zb = z.detach().clone().requires_grad_(True)
    cb = q.codebook.detach().double().requires_grad_(True)
    lt = q.log_temperature.detach().double().requires_grad_(True)
    expected, probs = _brute(zb, cb, lt, metric)
    expected_grads = torch.autograd.grad(expected, (zb, cb, lt), g)
    # SoftVQ's parameters are float32, so the float64 input meets a float32-rounded codebook: compare at 1e-5.
    torch.testing.assert_close(out.quantized, expected, rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-4)
    # indices: the most probable code, wherever the top two probabilities are not near-tied
    top2 = probs.topk(min(2, size), dim=-1).values
    clear = (top2[:, 0] - top2[:, -1] > 1e-6) if size > 1 else torch.ones(13, dtype=torch.bool)
    assert torch.equal(out.indices[clear], probs.argmax(-1)[clear])


def test_decode_returns_the_most_probable_codes_and_output_stays_soft():
    q = SoftVQ(6, 32, metric="cosine", temperature=0.5).eval()
    x = torch.randn(50, 6)
    out = q(x)
    assert q.soft
    decoded = q.decode(out.indices)
    torch.testing.assert_close(decoded, torch.nn.functional.normalize(q.codebook, dim=-1)[out.indices])
    assert not torch.allclose(decoded, out.quantized)  # a soft mix at t = 0.5, not a code
    q_l2 = SoftVQ(6, 32, metric="l2", temperature=1e-4).eval()  # t -> 0: the soft mix becomes the nearest code
    out = q_l2(x)
    torch.testing.assert_close(out.quantized, q_l2.decode(out.indices), rtol=1e-4, atol=1e-4)


def test_temperature_fixed_is_a_buffer_learnable_is_a_parameter():
    fixed, learned = SoftVQ(4, 8), SoftVQ(4, 8, learnable_temperature=True)
    assert "log_temperature" in dict(fixed.named_buffers()) and "log_temperature" in dict(learned.named_parameters())
    out = fixed(torch.randn(5, 4, requires_grad=True))
    out.quantized.sum().backward()
    assert fixed.codebook.grad is not None and fixed.codebook.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [dict(metric="l2", learnable_temperature=True), dict(metric="cosine")])
def test_contract_via_check_quantizer(kwargs):
    check_quantizer(SoftVQ(5, 16, **kwargs))


def test_eval_purity_and_state_dict_round_trip():
    a = SoftVQ(4, 16, learnable_temperature=True, channel_first=True).eval()
    x = torch.randn(2, 4, 3, 3)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    out = a(x)
    assert out.indices.shape == (2, 3, 3) and out.quantized.shape == x.shape
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    b = SoftVQ(4, 16, learnable_temperature=True, channel_first=True).eval()
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(x).indices, out.indices) and torch.equal(b(x).quantized, out.quantized)


def test_bad_config_and_input_raise():
    with pytest.raises(ValueError, match="metric"):
        SoftVQ(4, 8, metric="dot")
    for t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            SoftVQ(4, 8, temperature=t)
    q = create_quantizer("softvq", dim=4, codebook_size=8)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    for bad in (torch.randn(3, 5), torch.tensor([[float("nan")] * 4])):
        with pytest.raises(ValueError, match="x"):
            q(bad)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def _softvq_utilization(**kwargs) -> float:
    torch.manual_seed(0)
    q = SoftVQ(4, 64, **kwargs)
    direction = torch.tensor([1.0, 1.0, 0.0, 0.0])
    z = 3.0 * direction + torch.randn(1024, 4)  # latents on a cap of the sphere, as an encoder's often are
    target = torch.nn.functional.normalize(z, dim=-1)
    return utilization_after_training(q, z, torch.optim.Adam(q.parameters(), lr=1e-2), steps=5,
                                      loss_fn=lambda out: (out.quantized - target).square().mean())


def test_dead_code_revival_keeps_the_codebook_in_use():
    assert _softvq_utilization(dead_code=None) < 0.35  # codes off the cap get no softmax mass, no gradient
    assert _softvq_utilization(dead_code=DeadCodeConfig()) > 0.5

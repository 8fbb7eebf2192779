"""FSQ's rotation and code-noise options natively, and as the peer's orthogonal_rotation / noise_dropout in the
compat FSQ / ResidualFSQ, against the peer with its R copied by ``load_peer_state_dict``."""
import pytest
import torch

from quantkit import testing
from quantkit.quantizers import FSQ


def test_rotated_fsq_is_plain_fsq_of_the_rotated_input_rotated_back():
    torch.manual_seed(0)
    q = FSQ((5, 5, 5), rotation=True).eval()
    plain = FSQ((5, 5, 5)).eval()
    r = q.rotation.double()
    torch.testing.assert_close(r @ r.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    x = torch.randn(400, 3)
    out, ref = q(x), plain(x @ q.rotation)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.quantized, ref.quantized @ q.rotation.T)
    assert torch.equal(q.decode(out.indices), out.quantized)


@pytest.mark.parametrize("options", [dict(), dict(dim=8, grid="symmetric", bound="clamp")],
                         ids=["plain", "projected_symmetric_clamp"])
def test_rotated_fsq_passes_check_quantizer(options):
    make = lambda: FSQ((5, 5, 5), rotation=True, **options)  # noqa: E731
    torch.manual_seed(0)
    testing.check_quantizer(make(), make=make)


peer = pytest.importorskip("vector_quantize_pytorch")
import quantkit.compat.vector_quantize_pytorch as compat  # noqa: E402
from test_compat_vqpytorch import _assert_same, _pair  # noqa: E402  (the side-by-side helpers)


@pytest.mark.parametrize("name, options", [
    ("FSQ", dict(levels=[5, 5, 5, 5])),
    ("FSQ", dict(levels=[5, 5, 5], dim=12, num_codebooks=2, preserve_symmetry=True)),
    ("ResidualFSQ", dict(levels=[5, 5, 5], num_quantizers=3, dim=8)),
], ids=["fsq", "fsq_two_codebooks_symmetric", "residual"])
def test_orthogonal_rotation_matches_peer(name, options):
    p, a = _pair(name, orthogonal_rotation=True, **options)  # eval, the peer's R copied
    x = torch.randn(2, 200, options.get("dim", len(options["levels"]))) * 1.5
    out_p, out_a = p(x), a(x)
    _assert_same(out_p[:2], out_a[:2], atol=1e-5)
    if name == "FSQ":
        torch.testing.assert_close(a.indices_to_codes(out_a[1]), p.indices_to_codes(out_p[1]), atol=1e-5, rtol=0)
        p.train(), a.train()
        xp, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
        p(xp)[0].square().sum().backward()
        a(xa)[0].square().sum().backward()
        torch.testing.assert_close(xa.grad, xp.grad, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(a.get_output_from_indices(out_a[1]), out_a[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="orthogonal_rot"):
        getattr(compat, name)(**options).load_peer_state_dict(p.state_dict())


# ----------------------------------------------------------------------------------------------------------------
# noise_dropout: the peer's code noise, FSQ(noise_mode="code")


@pytest.mark.parametrize("name, options", [("FSQ", dict(levels=[5, 5, 5, 5], preserve_symmetry=True)),
                                           ("ResidualFSQ", dict(levels=[5, 4, 3], num_quantizers=2, dim=6))],
                         ids=["fsq", "residual"])
def test_noise_dropout_matches_peer_under_one_seed(name, options):
    # at 0.5 only: the peer draws its mask as full_like(z, p).bernoulli_(), probability 1/2 whatever p (a peer bug;
    # quantkit hits a share p, test_code_noise_is_uniform_quarter_range_on_the_hit_share)
    p, a = _pair(name, noise_dropout=0.5, **options)
    x = torch.randn(2, 300, options.get("dim", len(options["levels"])))
    _assert_same(p(x), a(x), atol=1e-5)  # eval: no noise
    p.train(), a.train()
    xp, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    out_p = p(xp)
    torch.manual_seed(5)
    out_a = a(xa)
    _assert_same(out_p, out_a, atol=1e-5)  # the same draws, in the same order
    assert not torch.allclose(out_a[0], a.eval()(x)[0])  # and the noise is there
    out_p[0].square().sum().backward()
    out_a[0].square().sum().backward()
    if name == "FSQ":  # (the residual gradient differs on purpose: docs)
        torch.testing.assert_close(xa.grad, xp.grad, atol=1e-4, rtol=1e-4)


def test_code_noise_is_uniform_quarter_range_on_the_hit_share():
    torch.manual_seed(0)
    q = FSQ((5,), grid="symmetric", noise_dropout=0.3, noise_mode="code").train()
    x = torch.full((40000, 1), 0.1)  # code 0 (the middle of five), away from the clamp
    out = q(x)
    offsets = out.quantized[:, 0]
    hit = offsets != 0
    assert abs(float(hit.float().mean()) - 0.3) < 0.01
    assert float(offsets.abs().max()) <= 0.5 and abs(float(offsets[hit].var()) - 1 / 12) < 0.005
    assert bool((out.indices == 2).all())
    with pytest.raises(ValueError, match="noise_mode"):
        FSQ((5,), noise_mode="code")  # the paper grid

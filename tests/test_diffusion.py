"""Noise processes against closed forms: q(x_t | x_0) moments, the exact denoisers of Gaussian data (DDPM / DDIM,
flow, MeanFlow) map N(0, 1) to N(mu, s^2), DDIM eta = 0 is deterministic, the MeanFlow JVP matches a central finite
difference and its identity holds for the exact average velocity, guidance w = 0 is the conditional model, and bad
arguments raise errors naming them. float64 where a closed form is compared."""
import math

import pytest
import torch

from quantkit.diffusion import (DDPM, FlowMatching, MeanFlow, beta_schedule, create_process, guided_denoiser,
                                list_processes, timestep_embedding)
from quantkit.generators.sampling import make_generator

MU, S = 1.5, 0.5  # data N(MU, S^2) per dimension
N = 20000


def gaussian_noise(n=N, dim=2, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_is_data_gaussian(x, tol_mean=0.02, tol_std=0.02):
    assert abs(float(x.mean()) - MU) < tol_mean, float(x.mean())
    assert abs(float(x.std()) - S) < tol_std, float(x.std())


# ------------------------------------------------------------------------------------------------------------------
# DDPM


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_abar_is_strictly_decreasing_inside_zero_one(schedule):
    process = DDPM(schedule=schedule)
    abar = process.alphas_cumprod
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    assert (abar > 0).all() and (abar < 1).all() and (abar[1:] < abar[:-1]).all()


def test_schedule_end_points_match_their_closed_forms():
    # linear 1e-4 -> 0.02 over 1000 steps: abar_T ~ 4.04e-5; cosine: abar_0 ~ 0.99996, beta_T clipped to 0.999
    linear = torch.cumprod(1 - beta_schedule("linear", 1000), 0)
    assert math.isclose(float(linear[-1]), 4.04e-5, rel_tol=0.01)
    cosine_betas = beta_schedule("cosine", 1000)
    assert float(cosine_betas[-1]) == 0.999
    assert math.isclose(float(1 - cosine_betas[0]), 0.99996, rel_tol=1e-5)


@pytest.mark.parametrize("t", [0, 300, 999])
def test_q_sample_has_mean_sqrt_abar_x0_and_variance_one_minus_abar(t):
    process = DDPM(schedule="cosine")
    x0 = torch.full((N, 4), 0.7, dtype=torch.float64)
    x_t = process.q_sample(x0, torch.full((N,), t), gaussian_noise(dim=4))
    abar = float(process.alphas_cumprod[t])
    assert abs(float(x_t.mean()) - math.sqrt(abar) * 0.7) < 4 * math.sqrt((1 - abar) / x_t.numel()) + 1e-12
    assert math.isclose(float(x_t.var()), 1 - abar, rel_tol=0.03, abs_tol=1e-12)


def exact_ddpm_denoiser(process):
    """The exact predictor for data N(MU, S^2): E[eps | x_t] = sqrt(1 - a)(x_t - sqrt(a) MU) / (a S^2 + 1 - a)."""

    def net(x, t, r):
        idx = (t * process.num_timesteps).round().long()
        a = process.alphas_cumprod[idx].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S ** 2 + 1 - a)
        if process.prediction == "eps":
            return eps
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0  # v = sqrt(a) eps - sqrt(1 - a) x0

    return net


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_exact_denoiser_maps_standard_noise_to_the_data_gaussian(sampler, prediction):
    # ancestral sampling with the fixed posterior variance loses variance on a coarse grid (std 0.464 at 50 steps,
    # 0.492 at 200, 0.496 at 1000): it needs more steps than DDIM
    process = DDPM(schedule="cosine", prediction=prediction, sampler=sampler)
    steps = 50 if sampler == "ddim" else 250
    out = process.sample(exact_ddpm_denoiser(process), gaussian_noise(), steps=steps, generator=make_generator(1))
    assert out.dtype == torch.float64 and out.shape == (N, 2)
    assert_is_data_gaussian(out, tol_std=0.015)


def test_ddim_with_eta_zero_is_deterministic_and_ddpm_is_not():
    process = DDPM(schedule="linear", sampler="ddim", eta=0.0)
    net = exact_ddpm_denoiser(process)
    noise = gaussian_noise(n=64)
    a = process.sample(net, noise, steps=20, generator=make_generator(1))
    b = process.sample(net, noise, steps=20, generator=make_generator(2))
    assert torch.equal(a, b)
    c = process.sample(net, noise, steps=20, generator=make_generator(1), sampler="ddpm")
    d = process.sample(net, noise, steps=20, generator=make_generator(2), sampler="ddpm")
    assert not torch.allclose(c, d)


def test_respacing_to_all_steps_is_the_original_chain_and_ends_are_kept():
    process = DDPM(num_timesteps=100)
    assert process.timesteps(100) == list(range(100))
    kept = process.timesteps(7)
    assert kept[0] == 0 and kept[-1] == 99 and len(set(kept)) == 7 and kept == sorted(kept)
    assert process.evaluations(7) == 7


def test_ddpm_loss_is_zero_mean_error_of_a_perfect_noise_predictor():
    # a denoiser that returns the very noise used: the loss must be exactly 0 (checks the target, not training)
    process = DDPM(num_timesteps=50)
    x0 = torch.randn(8, 3)
    torch.manual_seed(5)
    t_idx = torch.randint(50, (8,))
    noise = torch.randn_like(x0)
    x_t = process.q_sample(x0, t_idx, noise)
    a = process._abar(t_idx, x0)
    assert torch.allclose((x_t - a.sqrt() * x0) / (1 - a).sqrt(), noise, atol=1e-5)
    losses = process.training_loss(lambda x, t, r: torch.zeros_like(x), x0)
    assert losses.shape == (8,) and (losses > 0).all()


# ------------------------------------------------------------------------------------------------------------------
# flow matching


def gaussian_velocity(z, t, r=None):
    """Marginal velocity of z_t = (1 - t) x + t eps, x ~ N(MU, S^2): -MU + (t - (1 - t) S^2) / sigma_t^2 (z - m_t)."""
    t = t.reshape(-1, *([1] * (z.dim() - 1)))
    var = (1 - t) ** 2 * S ** 2 + t ** 2
    return -MU + (t - (1 - t) * S ** 2) / var * (z - (1 - t) * MU)


def test_flow_euler_with_the_true_velocity_reaches_the_data_gaussian():
    out = FlowMatching(sampler="euler").sample(gaussian_velocity, gaussian_noise(), steps=200)
    assert_is_data_gaussian(out)


def test_flow_heun_in_20_steps_matches_euler_in_200():
    noise = gaussian_noise(n=256)
    heun = FlowMatching(sampler="heun").sample(gaussian_velocity, noise, steps=20)
    euler = FlowMatching(sampler="euler").sample(gaussian_velocity, noise, steps=200)
    fine = FlowMatching(sampler="heun").sample(gaussian_velocity, noise, steps=400)
    # both approximate the exact ODE map z_1 -> MU + S z_1; Heun (2nd order) is the closer one
    assert torch.allclose(fine, MU + S * noise, atol=1e-5)
    assert (heun - fine).abs().max() < (euler - fine).abs().max()
    assert torch.allclose(heun, fine, atol=5e-3) and torch.allclose(heun, euler, atol=2e-2)
    assert FlowMatching(sampler="heun").evaluations(20) == 40


def test_flow_loss_of_the_true_velocity_is_the_conditional_variance_not_zero():
    torch.manual_seed(0)
    x0 = MU + S * torch.randn(N, 1, dtype=torch.float64)
    loss = FlowMatching(time_sampling="uniform").training_loss(gaussian_velocity, x0)
    assert loss.shape == (N,) and float(loss.mean()) > 0.05
    worse = FlowMatching(time_sampling="uniform").training_loss(lambda z, t, r: gaussian_velocity(z, t) + 0.3, x0)
    assert float(worse.mean()) > float(loss.mean()) + 0.05


# ------------------------------------------------------------------------------------------------------------------
# MeanFlow


def gaussian_average_velocity(z, t, r):
    """Exact u(z, r, t) for data N(MU, S^2): [(m_t - m_r) + (1 - sigma_r / sigma_t)(z - m_t)] / (t - r), m = (1 - .) MU;
    at r = t it is the marginal velocity."""
    shape = (-1, *([1] * (z.dim() - 1)))
    t, r = t.reshape(shape), r.reshape(shape)
    sig_t = ((1 - t) ** 2 * S ** 2 + t ** 2).sqrt()
    sig_r = ((1 - r) ** 2 * S ** 2 + r ** 2).sqrt()
    m_t, m_r = (1 - t) * MU, (1 - r) * MU
    h = t - r
    avg = ((m_t - m_r) + (1 - sig_r / sig_t) * (z - m_t)) / torch.where(h == 0, torch.ones_like(h), h)
    return torch.where(h == 0, gaussian_velocity(z, t.reshape(-1)), avg)


def test_meanflow_jvp_matches_a_central_finite_difference():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).double()

    def net(z, t, r):
        return mlp(torch.cat([z, t[:, None], r[:, None]], 1))

    z, v = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    t, r = torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) * 0.5
    u, dudt = MeanFlow.time_derivative(net, z, t, r, v)
    h = 1e-5
    fd = (net(z + h * v, t + h, r) - net(z - h * v, t - h, r)) / (2 * h)
    torch.testing.assert_close(dudt, fd, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(u, net(z, t, r))


def test_the_exact_average_velocity_satisfies_the_meanflow_identity():
    z = torch.randn(64, 2, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * 0.8 + 0.2
    r = t * torch.rand(64, dtype=torch.float64)
    v = gaussian_velocity(z, t)  # the marginal velocity is the tangent of the true trajectory
    target = MeanFlow().target(gaussian_average_velocity, z, t, r, v)
    torch.testing.assert_close(target, gaussian_average_velocity(z, t, r), atol=1e-7, rtol=1e-7)
    # and u(z, t - d, t) -> v(z, t)
    close = gaussian_average_velocity(z, t, t - 1e-7)
    torch.testing.assert_close(close, v, atol=1e-5, rtol=1e-5)


def test_meanflow_one_step_and_few_step_sampling_of_the_exact_u_agree_and_reach_the_data():
    noise = gaussian_noise()
    one = MeanFlow().sample(gaussian_average_velocity, noise, steps=1)
    torch.testing.assert_close(one, MU + S * noise)  # the 1-step map is affine: MU + S z_1
    four = MeanFlow().sample(gaussian_average_velocity, noise, steps=4)
    torch.testing.assert_close(four, one)
    assert_is_data_gaussian(one)


def test_meanflow_target_at_r_equal_t_is_the_flow_velocity_and_carries_no_gradient():
    lin = torch.nn.Linear(3, 3)

    def net(z, t, r):
        return lin(z) * (1 + t - r)[:, None]

    z, v = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.rand(4)
    assert torch.equal(MeanFlow().target(net, z, t, t, v), v)
    target = MeanFlow().target(net, z, t, t * 0.5, v)
    assert target.grad_fn is None and not target.requires_grad
    process = MeanFlow(ratio_r_neq_t=1.0)
    loss = process.training_loss(net, torch.randn(16, 3))
    assert loss.shape == (16,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_meanflow_with_all_rows_r_equal_t_and_p_zero_is_the_flow_matching_loss_summed_over_dims():
    x0 = torch.randn(32, 3)
    net = lambda z, t, r: z * 0.3 - t[:, None]  # noqa: E731
    torch.manual_seed(4)
    mf = MeanFlow(ratio_r_neq_t=0.0, adaptive_p=0.0, time_sampling="uniform").training_loss(net, x0)
    torch.manual_seed(4)
    t_a, t_b = torch.rand(32), torch.rand(32)
    _ = torch.rand(32)  # the r = t row selection
    t = torch.maximum(t_a, t_b)
    noise = torch.randn_like(x0)
    z = (1 - t[:, None]) * x0 + t[:, None] * noise
    torch.testing.assert_close(mf, (net(z, t, t) - (noise - x0)).pow(2).sum(1))


def test_meanflow_guidance_in_the_target_needs_the_null_denoiser():
    with pytest.raises(ValueError, match="uncond"):
        MeanFlow(guidance_omega=2.0).training_loss(lambda z, t, r: z, torch.randn(4, 2))
    loss = MeanFlow(guidance_omega=2.0).training_loss(lambda z, t, r: z, torch.randn(4, 2),
                                                      uncond=lambda z, t, r: torch.zeros_like(z))
    assert torch.isfinite(loss).all()


# ------------------------------------------------------------------------------------------------------------------
# shared interface


@pytest.mark.parametrize("name", ["ddpm", "flow", "meanflow"])
def test_every_process_samples_the_noise_shape_and_dtype_and_is_seeded(name):
    assert name in list_processes()
    process = create_process(name)
    noise = torch.randn(5, 4, 4, 3)
    net = lambda x, t, r: 0.1 * x  # noqa: E731
    a = process.sample(net, noise, steps=4, generator=make_generator(0))
    b = process.sample(net, noise, steps=4, generator=make_generator(0))
    assert a.shape == noise.shape and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert process.evaluations(4) >= 4
    assert type(create_process(name, **process.config())) is type(process)


def test_guidance_zero_is_the_conditional_denoiser_and_output_is_affine_in_the_scale():
    cond_shift, uncond_shift = 1.0, -2.0

    def both(x, t, r):  # first half conditional, second half null class
        half = x.shape[0] // 2
        return torch.cat([x[:half] + cond_shift, x[half:] + uncond_shift])

    x, t = torch.randn(3, 2), torch.rand(3)
    assert torch.equal(guided_denoiser(both, 0.0)(x, t, t), x + cond_shift)
    g1, g2, g3 = (guided_denoiser(both, w)(x, t, t) for w in (1.0, 2.0, 3.0))
    torch.testing.assert_close(g3 - g2, g2 - g1)
    torch.testing.assert_close(g1, x + cond_shift + (cond_shift - uncond_shift))


def test_timestep_embedding_shape_and_distinct_times():
    e = timestep_embedding(torch.tensor([0.0, 0.5, 1.0]), 9)
    assert e.shape == (3, 9) and not torch.allclose(e[0], e[1])


@pytest.mark.parametrize("bad,match", [
    (lambda: create_process("ddpm").sample(lambda x, t, r: x, torch.randn(2, 2), steps=0), "steps"),
    (lambda: create_process("flow").sample(lambda x, t, r: x, torch.randn(2, 2), steps=0), "steps"),
    (lambda: create_process("meanflow").sample(lambda x, t, r: x, torch.randn(2, 2), steps=-1), "steps"),
    (lambda: create_process("edm"), "unknown process 'edm'"),
    (lambda: create_process("ddpm", schedule="quadratic"), "schedule"),
    (lambda: create_process("ddpm", prediction="x0"), "prediction"),
    (lambda: create_process("ddpm", sampler="dpm"), "sampler"),
    (lambda: create_process("ddpm", num_timesteps=10, default_steps=5).sample(lambda x, t, r: x, torch.randn(2, 2), steps=11),
     "steps 11 exceeds num_timesteps 10"),
    (lambda: create_process("flow", sampler="rk4"), "sampler"),
    (lambda: create_process("flow", typo=1), "does not take"),
    (lambda: create_process("meanflow", ratio_r_neq_t=1.5), "ratio_r_neq_t"),
    (lambda: create_process("flow").sample(lambda x, t, r: x, torch.randn(2, 2), temperature=-1.0), "temperature"),
    (lambda: guided_denoiser(lambda x, t, r: x, -1.0), "guidance"),
])
def test_bad_arguments_raise_errors_naming_them(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()

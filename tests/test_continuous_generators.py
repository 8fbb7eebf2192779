"""Continuous generators (MAR with a per-token head, the whole-latent DiT) over every noise process: shapes,
seeding, guidance, MAR's token schedule, zero-initialised outputs, a tiny learning check, and the errors a user
sees for a bad request. Tiny models, few steps."""
import pytest
import torch

from quantkit.generators import (SamplingConfig, create_generator, example_config, generator_class, list_generators,
                                 make_generator)
from quantkit.generators.maskgit import masked_counts

CONTINUOUS = [n for n in list_generators() if generator_class(n).continuous]
PROCESSES = ["ddpm", "flow", "meanflow"]
FEW_STEPS = {"ddpm": {"num_timesteps": 100, "default_steps": 5}, "flow": {"default_steps": 3},
             "meanflow": {"default_steps": 1}}


def build(name, process=None, **overrides):
    kw = example_config(name)
    if process is not None:
        kw.update(process=process, process_kwargs=FEW_STEPS.get(process, {}))
    kw.update(overrides)
    return create_generator(name, **kw).eval()


def test_registry_has_the_continuous_generators_beside_the_token_ones():
    assert set(CONTINUOUS) == {"mar", "dit"}
    assert {"maskgit", "var"} <= set(list_generators()) - set(CONTINUOUS)


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("name", ["mar", "dit"])
def test_generate_returns_finite_float_latents_of_the_latent_shape_and_is_seeded(name, process):
    model = build(name, process)
    a = model.generate([0, 1, 2, 0], generator=make_generator(0))
    assert a.dtype == torch.float32 and tuple(a.shape) == (4, *model.latent_shape) and torch.isfinite(a).all()
    b = model.generate([0, 1, 2, 0], generator=make_generator(0))
    assert torch.equal(a, b)
    guided = model.generate([0, 1], sampling=SamplingConfig(guidance=1.5), generator=make_generator(1))
    assert guided.shape == (2, *model.latent_shape) and torch.isfinite(guided).all()


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("name", ["mar", "dit"])
def test_loss_is_a_finite_scalar_that_reaches_the_network(name, process):
    model = build(name, process).train()
    torch.manual_seed(0)
    for _ in range(3):  # adaLN-zero: the output layer, then the modulations, then the trunk come alive
        model.zero_grad()
        loss = model.loss(torch.randn(6, *model.latent_shape), torch.tensor([0, 1, 2, 0, 1, 2]))
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
    reached = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(n.startswith("transformer.") for n in reached)
    assert any(n.startswith(("head.", "patch_out.")) for n in reached)


@pytest.mark.parametrize("name", ["mar", "dit"])
def test_guidance_zero_is_the_conditional_model_and_guidance_is_a_no_op_when_the_null_class_equals_the_label(name):
    model = build(name, "flow")
    plain = model.generate([0, 1, 2], generator=make_generator(3))
    zero = model.generate([0, 1, 2], sampling=SamplingConfig(guidance=0.0), generator=make_generator(3))
    assert torch.equal(plain, zero)
    with torch.no_grad():  # make the model blind to the label: then cond == uncond and any guidance changes nothing
        model.cls_emb.weight.copy_(model.cls_emb.weight[:1].expand_as(model.cls_emb.weight))
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # lift the zero-initialised outputs so the network does something
        model.cls_emb.weight.copy_(model.cls_emb.weight[:1].expand_as(model.cls_emb.weight))
    cond = model.generate([0, 1, 2], generator=make_generator(4))
    guided = model.generate([0, 1, 2], sampling=SamplingConfig(guidance=2.0), generator=make_generator(4))
    torch.testing.assert_close(guided, cond, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cond, model.generate([0, 1, 2], generator=make_generator(5)))


def test_mar_reveals_every_token_exactly_once_in_k_steps():
    model = build("mar", "flow")
    L = model.num_tokens
    seen = []
    sample = model.process.sample

    def counting(net, noise, *args, **kw):
        seen.append(noise.shape[0])
        return sample(net, noise, *args, **kw)

    model.process.sample = counting
    model.generate([0, 1, 2], steps=4, generator=make_generator(0))
    counts = masked_counts(L, 4)
    assert sum(seen) == 3 * L and len(seen) == 4
    assert seen == [3 * (before - after) for before, after in zip([L] + counts[:-1], counts)]
    assert all(n >= 3 for n in seen)


def test_mar_linear_guidance_schedule_grows_to_the_full_scale():
    model = build("mar")
    scales = [model.guidance_at(2.0, m) for m in masked_counts(model.num_tokens, 4)]
    assert scales == sorted(scales) and scales[-1] == 2.0 and scales[0] < 2.0
    assert build("mar", guidance_schedule="constant").guidance_at(2.0, 10) == 2.0


def test_untrained_outputs_are_exactly_zero_and_temperature_zero_is_deterministic():
    mar = build("mar", "flow")
    x, t = torch.randn(5, 3), torch.rand(5)
    assert torch.equal(mar.head(x, t, t, torch.randn(5, mar.cfg.dim)), torch.zeros(5, 3))
    dit = build("dit", "flow")
    assert torch.equal(dit(torch.randn(2, *dit.latent_shape), t[:2], t[:2], torch.tensor([0, 1])),
                       torch.zeros(2, *dit.latent_shape))
    cold = SamplingConfig(temperature=1e-9)
    a = dit.generate([0, 1], sampling=cold, generator=make_generator(0))
    b = dit.generate([0, 1], sampling=cold, generator=make_generator(1))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_evaluations_per_image_count_the_network_calls():
    dit = build("dit", "meanflow")
    assert dit.evaluations_per_image() == 1 and dit.evaluations_per_image(2, guidance=1.0) == 4
    mar = build("mar", "flow")  # K = 4, 3 flow steps per head call
    assert mar.evaluations_per_image(4) == 4 * (1 + 3)
    assert mar.evaluations_per_image(4, guidance=1.0) == 2 * 4 * (1 + 3)


def test_dit_with_flow_learns_class_conditional_means():
    torch.manual_seed(0)
    model = create_generator("dit", latent_shape=(2, 2, 2), num_classes=2, dim=32, depth=1, heads=2, patch_size=2,
                             process="flow", process_kwargs={"default_steps": 8}, label_dropout=0.0).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    labels = torch.tensor([0, 1] * 32)
    latents = (1.0 - 2.0 * labels.float()).reshape(-1, 1, 1, 1).expand(-1, 2, 2, 2) + 0.1 * torch.randn(64, 2, 2, 2)
    for _ in range(150):
        opt.zero_grad()
        model.loss(latents, labels).backward()
        opt.step()
    out = model.eval().generate([0, 1] * 8, generator=make_generator(0))
    means = out.flatten(1).mean(1)
    assert (means[0::2] > 0.5).all() and (means[1::2] < -0.5).all(), means


@pytest.mark.parametrize("bad,match", [
    (lambda: build("dit").generate([0], steps=0), "steps"),
    (lambda: build("mar").generate([0], steps=0), "steps"),
    (lambda: build("mar").generate([3]), "unknown class 3"),
    (lambda: build("dit").generate([-1]), "unknown class -1"),
    (lambda: build("dit", process="edm"), "unknown process 'edm'"),
    (lambda: build("dit", process_kwargs={"sampler": "rk4"}, process="flow"), "sampler"),
    (lambda: build("dit").generate([0], sampling=SamplingConfig(top_k=5)), "top_k"),
    (lambda: build("dit").loss(torch.randn(2, 4, 4, 2), torch.tensor([0, 1])), r"latents must be .*\(B, 4, 4, 3\)"),
    (lambda: build("mar").loss(torch.full((2, 4, 4, 3), float("nan")), torch.tensor([0, 1])), "NaN"),
    (lambda: build("dit", patch_size=3), "patch_size 3"),
    (lambda: build("mar", guidance_schedule="cosine"), "guidance_schedule"),
])
def test_bad_requests_raise_errors_naming_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


# --------------------------------------------------------------------------------------------------------------
# the shared trainer on a KL-VAE's latents (an untrained tiny tokenizer: only the plumbing is under test)

@pytest.fixture(scope="module")
def tiny_klvae(tmp_path_factory):
    """An untrained tiny KL-VAE checkpoint on 8x8 digits (latents 4x4x3), and a discrete VQVAE one."""
    from quantkit.tokenizers import create_tokenizer
    from quantkit.tokenizers.train import save_checkpoint

    root = tmp_path_factory.mktemp("tok")
    kl = create_tokenizer("klvae", image_size=8, channels=1, ch=8, ch_mult=(1, 2), z_channels=8, embed_dim=3,
                          norm_groups=4, mid_attention=False)
    vq = create_tokenizer("vqvae", image_size=8, hidden=8, res_hidden=4, embed_dim=2, num_res_blocks=1,
                          quantizer="fsq", quantizer_kwargs={"levels": [4, 4]})
    save_checkpoint(root / "kl", 0, kl, None, None)
    save_checkpoint(root / "vq", 0, vq, None, None)
    return {"kl": str(root / "kl"), "vq": str(root / "vq")}


def _continuous_cfg(tok, out, generator="mar", **kw):
    from quantkit.generators.train import GeneratorTrainConfig

    model = {"mar": dict(dim=16, depth=1, heads=2, head_width=16, head_depth=1, process="ddpm",
                         process_kwargs={"num_timesteps": 50, "default_steps": 3}, default_steps=2),
             "dit": dict(dim=16, depth=1, heads=2, patch_size=2, process="meanflow")}.get(generator)
    base = dict(generator=generator, tokenizer=tok, out_dir=str(out), steps=4, batch_size=8, log_every=1,
                checkpoint_every=2, progress=False, model_config=model)
    return GeneratorTrainConfig(**{**base, **kw})


@pytest.mark.parametrize("generator", ["mar", pytest.param("dit", marks=pytest.mark.slow)])  # dit: JVP, 20 s
def test_resumed_continuous_run_repeats_the_losses_and_weights_of_an_uninterrupted_one(tiny_klvae, tmp_path,
                                                                                      generator):
    from quantkit.generators.train import load_generator, train_generator

    full = train_generator(_continuous_cfg(tiny_klvae["kl"], tmp_path / "full", generator))
    train_generator(_continuous_cfg(tiny_klvae["kl"], tmp_path / "part", generator, steps=2))
    resumed = train_generator(_continuous_cfg(tiny_klvae["kl"], tmp_path / "part", generator), resume=True)
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4]
    assert [l for _, l in resumed.losses] == pytest.approx([l for _, l in full.losses], abs=1e-6)
    (a, _), (b, _) = load_generator(tmp_path / "full"), load_generator(tmp_path / "part")
    assert a.continuous and a.latent_shape == (4, 4, 3)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=1e-6)


def test_samples_of_a_continuous_run_decode_to_images_in_the_unit_range(tiny_klvae, tmp_path):
    from quantkit.evaluation.generation import sample_images
    from quantkit.generators.train import generator_tokenizer_path, load_generator, train_generator
    from quantkit.tokenizers import load_tokenizer

    train_generator(_continuous_cfg(tiny_klvae["kl"], tmp_path / "run", steps=2))
    model, meta = load_generator(tmp_path / "run")
    tokenizer = load_tokenizer(generator_tokenizer_path(tmp_path / "run", meta))  # the copy the run carries
    images, latents, _ = sample_images(model, tokenizer, torch.tensor([0, 3, 9]), seed=0)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert latents.shape == (3, 4, 4, 3) and latents.dtype == torch.float32 and torch.isfinite(latents).all()


def test_continuous_generators_and_discrete_tokenizers_are_not_paired(tiny_klvae, tmp_path):
    from quantkit.generators.train import train_generator

    with pytest.raises(ValueError, match="pair MAR / DiT with a continuous tokenizer"):
        train_generator(_continuous_cfg(tiny_klvae["vq"], tmp_path / "a"))
    with pytest.raises(ValueError, match="pair MAR / DiT with a continuous tokenizer"):
        train_generator(_continuous_cfg(tiny_klvae["kl"], tmp_path / "b", generator="maskgit",
                                        model_config={"dim": 16, "depth": 1, "heads": 2}))

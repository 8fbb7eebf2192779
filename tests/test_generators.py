"""Generators: shapes, causality by perturbation, KV cache == full recompute, seeded sampling, MaskGIT schedule,
guidance, and the errors a user sees for a bad request. Tiny models, few steps."""
import math

import pytest
import torch

from quantkit.generators import (SamplingConfig, create_generator, example_config, generator_class,
                                 list_generators, make_generator)
from quantkit.generators.maskgit import cosine_schedule, masked_counts
from quantkit.generators.sampling import guided_logits, top_k_filter, top_p_filter
from quantkit.generators.var import block_causal_mask, split_scales

#: the token generators (the continuous ones, MAR and DiT, are tested in tests/test_continuous_generators.py)
NAMES = [n for n in list_generators() if not generator_class(n).continuous]


def build(name, **overrides):
    model = create_generator(name, **{**example_config(name), **overrides})
    return model.eval()


def random_ids(model, batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, *model.cfg.token_shape), generator=gen)


def test_registry_lists_all_four_generators():
    assert set(NAMES) == {"maskgit", "var", "rq_transformer", "pixelcnn"}


@pytest.mark.parametrize("name", NAMES)
def test_generate_returns_int64_ids_of_the_token_shape_within_the_vocabulary(name):
    model = build(name)
    ids = model.generate([0, 1, 2, 0], generator=make_generator(0))
    assert ids.dtype == torch.long and tuple(ids.shape) == (4, *model.cfg.token_shape)
    assert int(ids.min()) >= 0 and int(ids.max()) < model.vocab_size


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_finite_and_backpropagates(name):
    model = build(name).train()
    loss = model.loss(random_ids(model), torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and loss.ndim == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_seeded_sampling_is_reproducible(name):
    model = build(name)
    cfg = SamplingConfig(temperature=1.0, guidance=1.0)
    a = model.generate([0, 1, 2], sampling=cfg, generator=make_generator(7))
    b = model.generate([0, 1, 2], sampling=cfg, generator=make_generator(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_guidance_zero_equals_conditional_sampling(name):
    model = build(name)
    plain = model.generate([0, 1, 2], sampling=SamplingConfig(), generator=make_generator(3))
    guided0 = model.generate([0, 1, 2], sampling=SamplingConfig(guidance=0.0), generator=make_generator(3))
    assert torch.equal(plain, guided0)
    cond, uncond = torch.randn(2, 5, 7).unbind(0)
    assert torch.equal(guided_logits(cond, uncond, 0.0), cond)


# --------------------------------------------------------------------------------------------------------------
# causality, by perturbation: changing a later token never changes an earlier position's logits

def _changed_at(ids, order_len, p, vocab):
    """ids with every code of raster position p shifted by one."""
    changed = ids.clone().reshape(ids.shape[0], order_len, -1)
    changed[:, p] = (changed[:, p] + 1) % vocab
    return changed.reshape(ids.shape)


def _unchanged(out, base):
    """(B, P, ...) -> (P,) bool: True where a position's logits did not move."""
    return ((out - base).abs().amax(dim=tuple(d for d in range(out.dim()) if d != 1)) < 1e-5)


def test_pixelcnn_logits_depend_only_on_earlier_tokens_in_raster_order():
    model = build("pixelcnn")
    ids, labels = random_ids(model), torch.tensor([0, 1, 2])
    H, W = model.cfg.token_shape
    base = model(ids, labels).reshape(3, H * W, -1)
    for p in [0, 5, H * W - 1]:
        same = _unchanged(model(_changed_at(ids, H * W, p, model.vocab_size), labels).reshape(3, H * W, -1), base)
        assert same[:p + 1].all(), f"token {p} leaked into the logits of itself or an earlier position"
        assert p == H * W - 1 or not same[p + 1:].all(), "later positions should see the change"


def test_rq_transformer_logits_are_causal_over_positions():
    model = build("rq_transformer")
    ids, labels = random_ids(model), torch.tensor([0, 1, 2])
    h, w, D = model.cfg.token_shape
    base = model(ids, labels).reshape(3, h * w, D, -1)
    for p in [0, 4, h * w - 1]:
        out = model(_changed_at(ids, h * w, p, model.vocab_size), labels).reshape(3, h * w, D, -1)
        assert _unchanged(out, base)[:p].all(), f"position {p} leaked into earlier positions"
        assert torch.allclose(out[:, p, 0], base[:, p, 0], atol=1e-5)  # its own first code cannot see it


def test_var_logits_of_a_scale_depend_only_on_coarser_scales():
    model = build("var")
    ids = random_ids(model)
    labels = torch.tensor([0, 1, 2])
    base = model(ids, labels)
    starts = model.starts
    for k in range(len(model.scales)):
        changed = ids.clone()
        changed[:, starts[k]:starts[k + 1]] = (changed[:, starts[k]:starts[k + 1]] + 1) % model.vocab_size
        out = model(changed, labels)
        assert torch.allclose(out[:, :starts[k + 1]], base[:, :starts[k + 1]], atol=1e-5)  # this and coarser
        if k + 1 < len(model.scales):
            assert not torch.allclose(out[:, starts[k + 1]:], base[:, starts[k + 1]:], atol=1e-5)


def test_var_block_causal_mask_lets_a_scale_see_itself_and_coarser_scales_only():
    mask = block_causal_mask((1, 2, 3))
    assert mask.shape == (14, 14)
    assert mask[0, 0] and not mask[0, 1:].any()
    assert mask[1:5, :5].all() and not mask[1:5, 5:].any()
    assert mask[5:].all()


def test_var_accepts_per_scale_maps_or_the_flat_sequence():
    model = build("var")
    seq = random_ids(model)
    maps = split_scales(seq, model.scales)
    assert [m.shape[-1] for m in maps] == list(model.scales)
    torch.manual_seed(0)
    a = model.loss(seq, torch.tensor([0, 1, 2]))
    torch.manual_seed(0)
    b = model.loss(maps, torch.tensor([0, 1, 2]))
    assert torch.equal(a, b)


def test_maskgit_logits_see_the_whole_grid():
    model = build("maskgit")
    ids = random_ids(model).flatten(1)
    labels = torch.tensor([0, 1, 2])
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.vocab_size
    assert not torch.allclose(model(ids, labels)[:, 0], model(changed, labels)[:, 0])  # bidirectional


# --------------------------------------------------------------------------------------------------------------
# KV cache decoding gives the logits of a full recompute

def test_var_kv_cache_decoding_equals_full_recompute():
    model = build("var")
    ids = random_ids(model)
    labels = torch.tensor([0, 1, 2])
    full = model(ids, labels)
    maps = split_scales(ids, model.scales)
    cond = model.cls_emb(labels)
    cache = model.transformer.new_cache()
    for k in range(len(model.scales)):
        x = model._start(cond) if k == 0 else model._scale_input(maps, k)
        step = model.head(model.transformer(model._embed(x, k, k + 1), cond, None, cache))
        assert torch.allclose(step, full[:, model.starts[k]:model.starts[k + 1]], atol=1e-5)


def test_rq_transformer_kv_cache_decoding_equals_full_recompute():
    model = build("rq_transformer")
    ids = random_ids(model)
    labels = torch.tensor([0, 1, 2])
    full = model(ids, labels).reshape(3, model.T, model.D, -1)
    codes = ids.reshape(3, model.T, model.D)
    cache_t = model.spatial.new_cache()
    x = model.cls_emb(labels)[:, None]
    for t in range(model.T):
        h = model.spatial(x + model.pos_hw[:, t:t + 1], cache=cache_t)[:, 0]
        cache_d = model.depth.new_cache()
        z = model._depth_inputs(h, codes[:, t])  # (B, D, C), already position-encoded
        for d in range(model.D):
            out = model.head(model.depth(z[:, d:d + 1], cache=cache_d)[:, 0])
            assert torch.allclose(out, full[:, t, d], atol=1e-5)
        x = model.spatial_emb(codes[:, t]).sum(1)[:, None]
    assert len(cache_t) == model.T


def test_transformer_mlp_without_autograd_matches_the_autograd_path_and_leaves_its_input_alone():
    from quantkit.generators.transformer import MLP

    mlp = MLP(16, 4.0)
    x = torch.randn(3, 5, 16)
    x_before = x.clone()
    expected = mlp(x)  # autograd on: out-of-place GELU
    with torch.no_grad():
        got = mlp(x)  # in-place GELU on the hidden activations
    torch.testing.assert_close(got, expected.detach())
    assert torch.equal(x, x_before)


# --------------------------------------------------------------------------------------------------------------
# MaskGIT schedule

def test_cosine_schedule_falls_from_one_to_zero_monotonically():
    r = torch.linspace(0, 1, 101)
    g = cosine_schedule(r)
    assert math.isclose(float(g[0]), 1.0) and float(g[-1]) < 1e-6
    assert (g[1:] <= g[:-1] + 1e-7).all()


@pytest.mark.parametrize("steps", [1, 2, 8, 16, 40])
def test_maskgit_masked_counts_decrease_strictly_and_end_at_zero(steps):
    counts = masked_counts(16, steps)
    assert counts[-1] == 0 or 0 in counts
    seq = [16] + counts[:counts.index(0) + 1]
    assert all(b < a for a, b in zip(seq, seq[1:]))


def test_maskgit_decoding_reveals_every_token_with_no_mask_left():
    model = build("maskgit")
    for steps in (1, 3, 8):
        ids = model.generate([0, 1], steps=steps, generator=make_generator(0))
        assert int(ids.max()) < model.vocab_size  # mask id == vocab_size never survives


def test_maskgit_evaluations_count_steps_and_double_under_guidance():
    model = build("maskgit")
    assert model.evaluations_per_image(8) == 8
    assert model.evaluations_per_image(8, guidance=2.0) == 16


# --------------------------------------------------------------------------------------------------------------
# sampling filters

def test_top_k_keeps_exactly_k_and_top_p_keeps_the_top_token():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).sum() == 2
    kept = torch.isfinite(top_p_filter(logits, 0.01))
    assert kept.tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="guidance"):
        SamplingConfig(guidance=-1)


# --------------------------------------------------------------------------------------------------------------
# bad requests get clear errors

@pytest.mark.parametrize("name", NAMES)
def test_unknown_class_is_refused_with_the_known_range(name):
    model = build(name)
    with pytest.raises(ValueError, match=r"unknown class 7.*0\.\.2"):
        model.generate([0, 7])
    with pytest.raises(ValueError, match="unknown class -1"):
        model.generate([-1])


@pytest.mark.parametrize("name", NAMES)
def test_zero_steps_is_refused(name):
    with pytest.raises(ValueError, match="steps must be a positive int"):
        build(name).generate([0], steps=0)


@pytest.mark.parametrize("name", NAMES)
def test_ids_outside_the_vocabulary_are_refused(name):
    model = build(name)
    ids = random_ids(model)
    ids.view(-1)[0] = model.vocab_size + 3
    with pytest.raises(ValueError, match="vocabulary"):
        model.loss(ids, torch.tensor([0, 1, 2]))


def test_unknown_generator_and_config_key_are_refused():
    with pytest.raises(ValueError, match="unknown generator"):
        create_generator("nope")
    with pytest.raises(ValueError, match="unknown config keys"):
        create_generator("maskgit", widht=3)


# --------------------------------------------------------------------------------------------------------------
# training, checkpoints, sampling from a checkpoint (a 2-step tokenizer: only the plumbing is under test)

@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    """Two untrained tiny VQVAE checkpoints (vocab 16 and 9), written with the tokenizer checkpoint writer."""
    from quantkit.tokenizers import create_tokenizer
    from quantkit.tokenizers.train import save_checkpoint

    root = tmp_path_factory.mktemp("tok")
    paths = {}
    for name, levels in (("a", [4, 4]), ("b", [3, 3])):
        tok = create_tokenizer("vqvae", hidden=8, res_hidden=4, embed_dim=2, num_res_blocks=1, quantizer="fsq",
                               quantizer_kwargs={"levels": levels})
        save_checkpoint(root / name, 0, tok, None, None)
        paths[name] = str(root / name)
    return paths


def _train_cfg(tok, out, **kw):
    from quantkit.generators.train import GeneratorTrainConfig

    base = dict(generator="maskgit", tokenizer=tok, out_dir=str(out), steps=4, batch_size=8, log_every=1,
                checkpoint_every=2, progress=False, model_config={"dim": 16, "depth": 1, "heads": 2})
    return GeneratorTrainConfig(**{**base, **kw})


def test_resumed_training_repeats_the_losses_of_an_uninterrupted_run(tiny_tokenizers, tmp_path):
    from quantkit.generators.train import train_generator

    full = train_generator(_train_cfg(tiny_tokenizers["a"], tmp_path / "full"))
    train_generator(_train_cfg(tiny_tokenizers["a"], tmp_path / "part", steps=2))
    resumed = train_generator(_train_cfg(tiny_tokenizers["a"], tmp_path / "part"), resume=True)
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4]
    assert [l for _, l in resumed.losses] == pytest.approx([l for _, l in full.losses], abs=1e-6)
    with pytest.raises(FileExistsError, match="--resume"):
        train_generator(_train_cfg(tiny_tokenizers["a"], tmp_path / "full"))


def _checkpoint(run, step):
    from safetensors.torch import load_file

    folder = run / "checkpoints" / f"step_{step:07d}"
    return load_file(str(folder / "model.safetensors")), torch.load(folder / "train_state.pt", weights_only=True)


def test_ema_checkpoint_holds_the_decayed_average_of_the_weights(tiny_tokenizers, tmp_path):
    from quantkit.generators.train import load_generator, train_generator

    train_generator(_train_cfg(tiny_tokenizers["a"], tmp_path / "ema", steps=3, checkpoint_every=1,
                               keep_checkpoints=3, ema_decay=0.75))
    (ema1, state1), (ema2, state2), (ema3, state3) = (_checkpoint(tmp_path / "ema", s) for s in (1, 2, 3))
    for name, w1 in state1["weights"].items():
        w2, w3 = state2["weights"][name], state3["weights"][name]
        torch.testing.assert_close(ema1[name], w1)  # the first update copies the weights
        expected = 0.75 * (0.75 * w1 + 0.25 * w2) + 0.25 * w3
        torch.testing.assert_close(ema3[name], expected, rtol=1e-5, atol=1e-6)
    assert state3["ema_updates"] == 3
    assert any(not torch.equal(ema3[k], state3["weights"][k]) for k in ema3)
    model, _ = load_generator(tmp_path / "ema")  # sampling loads the average
    torch.testing.assert_close(model.state_dict(), {k: v for k, v in ema3.items()})


def test_resumed_ema_run_ends_with_the_weights_and_average_of_an_uninterrupted_run(tiny_tokenizers, tmp_path):
    from quantkit.generators.train import train_generator

    train_generator(_train_cfg(tiny_tokenizers["a"], tmp_path / "full", ema_decay=0.9))
    train_generator(_train_cfg(tiny_tokenizers["a"], tmp_path / "part", steps=2, ema_decay=0.9))
    train_generator(_train_cfg(tiny_tokenizers["a"], tmp_path / "part", ema_decay=0.9), resume=True)
    (full_ema, full_state), (part_ema, part_state) = _checkpoint(tmp_path / "full", 4), _checkpoint(tmp_path / "part", 4)
    for k in full_ema:
        torch.testing.assert_close(part_ema[k], full_ema[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(part_state["weights"][k], full_state["weights"][k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="ema_decay"):  # the other setting cannot resume it
        train_generator(_train_cfg(tiny_tokenizers["a"], tmp_path / "part", steps=6), resume=True)
    for bad in (1.0, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="ema_decay"):
            _train_cfg(tiny_tokenizers["a"], tmp_path / "bad", ema_decay=bad)


def test_sample_writes_a_grid_and_ids_and_refuses_bad_requests(tiny_tokenizers, tmp_path):
    from quantkit.generators.sample import sample
    from quantkit.generators.train import train_generator

    run = tmp_path / "run"
    train_generator(_train_cfg(tiny_tokenizers["a"], run, steps=2))
    result = sample(run, labels=[1, 2], count=3, steps=2, guidance=1.0, seed=5, out_dir=tmp_path / "s")
    assert result.grid_path.is_file() and result.ids_path.is_file()
    assert result.images.shape == (6, 1, 16, 16) and result.labels.tolist() == [1, 1, 1, 2, 2, 2]
    again = sample(run, labels=[1, 2], count=3, steps=2, guidance=1.0, seed=5)
    assert torch.equal(result.ids, again.ids)
    with pytest.raises(ValueError, match="unknown class 10"):
        sample(run, labels=[10])
    with pytest.raises(ValueError, match="steps must be a positive int"):
        sample(run, labels=[1], steps=0)
    with pytest.raises(ValueError, match="vocabulary of 9 codes.*trained on 16"):
        sample(run, labels=[1], tokenizer_path=tiny_tokenizers["b"])


def test_var_needs_a_multiscale_tokenizer(tiny_tokenizers, tmp_path):
    from quantkit.generators.train import train_generator

    with pytest.raises(ValueError, match="multiscale_residual"):
        train_generator(_train_cfg(tiny_tokenizers["a"], tmp_path / "v", generator="var", model_config={}))


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_generator_weights(tiny_tokenizers, tmp_path):
    import json
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = tmp_path / "ddp_gen.py"
    script.write_text(textwrap.dedent("""
        import json, sys, torch, torch.distributed as dist
        import quantkit.generators.train as T
        cfg = T.GeneratorTrainConfig(**json.loads(sys.argv[1]))
        real, built = T.generator_for_tokenizer, {}
        def build(*a, **k):
            built["model"] = real(*a, **k)
            return built["model"]
        T.generator_for_tokenizer = build
        T.train_generator(cfg)
        torch.save({"world": dist.get_world_size(), "state": built["model"].state_dict()},
                   f"{cfg.out_dir}/rank{dist.get_rank()}.pt")
        dist.destroy_process_group()
    """))
    out = tmp_path / "ddp"
    cfg = _train_cfg(tiny_tokenizers["a"], out, steps=3).to_dict()
    import quantkit

    root = str(Path(quantkit.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(30500 + os.getpid() % 1000), str(script), json.dumps(cfg)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert json.loads((out / "latest.json").read_text())["step"] == 3


def test_digits_pixelcnn_baseline_has_maskgits_parameter_count_within_ten_percent():
    from quantkit.generators.train import DIGITS_RECIPES

    counts = {name: create_generator(name, vocab_size=64, token_shape=(8, 8), num_classes=10,
                                     **DIGITS_RECIPES[name]["model_config"]).num_parameters()
              for name in ("maskgit", "pixelcnn")}
    assert abs(counts["pixelcnn"] - counts["maskgit"]) <= 0.1 * counts["maskgit"], counts

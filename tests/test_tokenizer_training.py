"""Training loop: exact resume, atomic checkpoints, Ctrl-C, bad input, CLI, GAN and TiTok two-stage paths, and
DistributedDataParallel on 2 CPU processes (gloo)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quantkit.cli import main as cli_main
from quantkit.quantizers import list_quantizers
from quantkit.training import CheckpointError, rewrite_config
from quantkit.tokenizers.train import TrainConfig, load_tokenizer, read_metrics, train_tokenizer

QUANTIZER = "vq" if "vq" in list_quantizers() else "fsq"
QKW = {"codebook_size": 16} if QUANTIZER == "vq" else {"levels": [5, 3]}
DIM = 4 if QUANTIZER == "vq" else 2
TINY_VQVAE = {"hidden": 16, "res_hidden": 8, "num_res_blocks": 1, "embed_dim": DIM}
TINY_VQGAN = {"ch": 8, "ch_mult": [1, 2], "z_channels": 8, "norm_groups": 4, "embed_dim": DIM, "attn_levels": []}


def _data(n=24, size=8, channels=1):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(channels, size, size, generator=g), i % 3) for i in range(n)]


def _config(tmp_path, name="run", **kw):
    base = dict(model="vqvae", model_config=TINY_VQVAE, quantizer=QUANTIZER, quantizer_kwargs=QKW, steps=6,
                batch_size=4, log_every=1, checkpoint_every=100, eval_images=0, progress=False, warmup_steps=2,
                out_dir=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return load_tokenizer(path).state_dict()


def test_interrupted_then_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
    data = _data()
    full = train_tokenizer(_config(tmp_path, "full"), dataset=data)

    def interrupt(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # acts as Ctrl-C: a checkpoint of step 3 is saved first
        train_tokenizer(_config(tmp_path, "split"), dataset=data, callback=interrupt)
    assert json.loads((tmp_path / "split" / "latest.json").read_text())["step"] == 3
    resumed = train_tokenizer(_config(tmp_path, "split"), dataset=data, resume=True)
    a, b = read_metrics(full.out_dir), read_metrics(resumed.out_dir)
    assert [m["step"] for m in b] == list(range(1, 7))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # bit-identical, not merely close
    wa, wb = _weights(full.checkpoint), _weights(resumed.checkpoint)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_holds_weights_config_and_optimizer_state(tmp_path):
    result = train_tokenizer(_config(tmp_path, steps=2), dataset=_data())
    files = sorted(p.name for p in result.checkpoint.iterdir())
    assert files == ["config.json", "manifest.json", "model.safetensors", "train_state.pt"]
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config["model"] == "vqvae" and config["token_shape"] == [2, 2] and config["train_config"]["steps"] == 2
    state = torch.load(result.checkpoint / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and state["optimizer"]["state"]
    tok = load_tokenizer(tmp_path / "run")
    assert tok.token_shape == (2, 2) and not tok.training


def test_failed_checkpoint_write_leaves_the_previous_one_in_place(tmp_path, monkeypatch):
    import safetensors.torch

    config = _config(tmp_path, steps=4, checkpoint_every=2)
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def flaky(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint dies halfway through writing its weights
            Path(path).write_bytes(b"partial")
            raise OSError("disk full")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        train_tokenizer(config, dataset=_data())
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    run = tmp_path / "run"
    assert json.loads((run / "latest.json").read_text())["step"] == 2
    assert not (run / "checkpoints" / "step_0000004").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]  # no partial folder left
    assert load_tokenizer(run).token_shape == (2, 2)  # the good checkpoint still loads


def test_bad_requests_get_clear_errors(tmp_path):
    data = _data()
    train_tokenizer(_config(tmp_path, steps=1), dataset=data)
    with pytest.raises(FileExistsError, match="--resume"):
        train_tokenizer(_config(tmp_path, steps=1), dataset=data)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        _config(tmp_path, steps=0)
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({"stpes": 3})
    with pytest.raises(ValueError, match=r"dim=7.*embed_dim"):
        train_tokenizer(_config(tmp_path, "dim", quantizer_kwargs={**QKW, "dim": 7}), dataset=data)
    # weights of one model under the config of another: the error names the keys
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000001"
    original = (ckpt / "config.json").read_text()
    config = json.loads(original)
    config["model"] = "vqgan"
    config["tokenizer_config"] = {"image_size": 8, "channels": 1, "quantizer": QUANTIZER, "quantizer_kwargs": QKW,
                                  **{k: v for k, v in TINY_VQGAN.items()}}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json' is truncated or overwritten"):  # the manifest sees it
        load_tokenizer(ckpt)
    (ckpt / "config.json").write_text(original)
    rewrite_config(ckpt, config)  # an edit that goes through the manifest
    with pytest.raises(ValueError, match="missing keys.*Was it written by another model"):
        load_tokenizer(ckpt)
    rewrite_config(ckpt, {"format": "something-else"})
    with pytest.raises(ValueError, match="not a quantkit tokenizer checkpoint"):
        load_tokenizer(ckpt)


def test_cli_train_then_eval_on_an_image_folder(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "cli"
    cli_main(["train-tokenizer", "--model", "vqvae", "--quantizer", QUANTIZER, "--quantizer-kwargs", json.dumps(QKW),
              "--model-config", json.dumps(TINY_VQVAE), "--data", str(folder), "--image-size", "8", "--steps", "2",
              "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("step_0000002")
    cli_main(["eval-tokenizer", str(out), "--split", "train", "--out", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for key in ("psnr", "ssim", "utilization", "perplexity", "tokens_per_image", "encode_images_per_s",
                "decode_images_per_s"):
        assert key in report
    assert report["tokens_per_image"] == 4 and (tmp_path / "eval" / "reconstructions.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="contains no images"):
        cli_main(["train-tokenizer", "--data", str(empty), "--out", str(tmp_path / "x"), "--no-progress"])


def test_vqgan_with_discriminator_and_perceptual_loss_resumes_exactly(tmp_path):
    features = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
    features.save(str(tmp_path / "features.pt"))
    gan = {"enabled": True, "disc_start": 1, "ndf": 8, "n_layers": 1,
           "perceptual_weights": str(tmp_path / "features.pt")}
    config = _config(tmp_path, "full", model="vqgan", model_config=TINY_VQGAN, steps=4, gan=gan)
    result = train_tokenizer(config, dataset=_data())
    logged = read_metrics(result.out_dir)
    assert "gan" not in logged[0] and {"gan", "disc", "perceptual"} <= set(logged[-1])  # GAN off before disc_start
    state = torch.load(result.checkpoint / "train_state.pt", weights_only=True)
    assert state["disc"] is not None and not any("disc" in k for k in _weights(result.checkpoint))

    def interrupt(step, metrics):
        if step == 2:
            raise KeyboardInterrupt

    split = _config(tmp_path, "split", model="vqgan", model_config=TINY_VQGAN, steps=4, gan=gan)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(split, dataset=_data(), callback=interrupt)
    train_tokenizer(split, dataset=_data(), resume=True)
    assert [m["loss"] for m in read_metrics(tmp_path / "split")] == [m["loss"] for m in logged]
    assert "perceptual loss: off (no local weights given)" in _config(tmp_path, gan={"enabled": True}).gan.describe()


def test_titok_two_stage_with_proxy_codes_from_a_trained_vqgan(tmp_path):
    data = _data(size=8)
    vqgan = train_tokenizer(_config(tmp_path, "vqgan", model="vqgan", model_config=TINY_VQGAN, steps=2), dataset=data)
    titok_cfg = {"width": 16, "depth": 1, "heads": 2, "num_latent_tokens": 4, "token_size": DIM, "patch_size": 2,
                 "head": "proxy_codes"}
    stage1 = train_tokenizer(_config(tmp_path, "s1", model="titok", model_config=titok_cfg, steps=2,
                                     proxy_tokenizer=str(vqgan.checkpoint)), dataset=data)
    assert "proxy_ce" in read_metrics(stage1.out_dir)[-1]
    stage2 = train_tokenizer(_config(tmp_path, "s2", model="titok", model_config={**titok_cfg, "stage": 2}, steps=2,
                                     proxy_tokenizer=str(vqgan.checkpoint), init_from=str(stage1.checkpoint)),
                             dataset=data)
    assert "recon" in read_metrics(stage2.out_dir)[-1]
    tok = load_tokenizer(stage2.checkpoint)  # the proxy VQGAN travels inside the TiTok checkpoint
    s1 = load_tokenizer(stage1.checkpoint)
    assert torch.equal(tok.encoder.conv_out.weight, s1.encoder.conv_out.weight)  # stage 2 froze the encoder
    x = torch.rand(2, 1, 8, 8)
    assert tok.decode(tok.encode(x)).shape == x.shape


@pytest.mark.slow  # three Python processes start; run once per CI pass, not in the reference-kernel rerun
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_train.py"
    # every rank saves the weights it trained, so the two can be compared
    script.write_text(textwrap.dedent("""
        import json, sys, torch, torch.distributed as dist
        import quantkit.tokenizers.train as T
        cfg = T.TrainConfig(**json.loads(sys.argv[1]))
        g = torch.Generator().manual_seed(1)
        data = [(torch.rand(1, 8, 8, generator=g), 0) for _ in range(24)]
        real_build = T.build_tokenizer_for
        built = {}
        def build(*a, **k):
            built["model"] = real_build(*a, **k)
            return built["model"]
        T.build_tokenizer_for = build
        T.train_tokenizer(cfg, dataset=data)
        rank = dist.get_rank()
        torch.save({"world": dist.get_world_size(), "state": built["model"].state_dict()},
                   f"{cfg.out_dir}/rank{rank}.pt")
        dist.destroy_process_group()
    """))
    out = tmp_path / "ddp"
    cfg = _config(tmp_path, "ddp", steps=3).to_dict()
    import quantkit

    root = str(Path(quantkit.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + os.getpid() % 1000), str(script), json.dumps(cfg)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert json.loads((out / "latest.json").read_text())["step"] == 3

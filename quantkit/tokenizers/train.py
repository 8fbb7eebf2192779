"""Training loop for tokenizers, shared by ``quantkit train-tokenizer`` and Python (:func:`train_tokenizer`).

    result = train_tokenizer(TrainConfig(model="vqgan", quantizer="fsq", quantizer_kwargs={"levels": [8, 5, 5, 5]},
                                         model_config={"embed_dim": 4}, data="digits", steps=1500, out_dir="runs/t"))
    tok = load_tokenizer(result.checkpoint)

A run folder holds
    checkpoints/step_XXXXXXX/   model.safetensors (weights), config.json (model + training config, metrics),
                                train_state.pt (step, optimizer, discriminator and its optimizer)
    latest.json                 which checkpoint is newest (replaced atomically)
    metrics.jsonl               one line per logged step (loss terms, PSNR, codebook usage, lr)

The one idea to hold: step s is a pure function of (weights, optimizer state, seed, s). Its batch indices and the
global RNG are both seeded from (seed, s), so a run resumed from the checkpoint of step s repeats exactly the losses
of an uninterrupted one; a checkpoint is written into a temporary folder and renamed into place, so an interrupted
write never replaces a good checkpoint.

Under ``torchrun`` (WORLD_SIZE > 1) each process takes its slice of the global batch and DistributedDataParallel
averages the gradients (gloo on CPU, NCCL on CUDA); rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..data import dataset_channels, load_dataset, stack_batch
from .base import Tokenizer, reject_unknown_fields
from .discriminator import DiscriminatorConfig, PatchDiscriminator
from .losses import GANLossConfig, PerceptualLoss, adaptive_weight, hinge_d_loss, hinge_g_loss

FORMAT = "quantkit-tokenizer"
FORMAT_VERSION = 1


class RunConfig:
    """What the tokenizer and generator training configs share: JSON round trip and the loop's common checks."""

    def _check_loop_fields(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        reject_unknown_fields(cls, d)
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike):
        with open(path) as f:
            return cls.from_dict(json.load(f))


@dataclass
class TrainConfig(RunConfig):
    """Everything a training run depends on (saved in every checkpoint's config.json).

    model_config: overrides of the tokenizer's config (e.g. {"embed_dim": 4, "ch": 64}); quantizer /
    quantizer_kwargs: the quantizer (any registered name); data: "digits", "patches" or an image folder;
    image_size: None = the dataset's default; proxy_tokenizer: a trained quantkit VQGAN run/checkpoint (TiTok
    head="proxy_codes"); init_from: a tokenizer checkpoint whose weights start this run (TiTok stage 2).
    """

    model: str = "vqgan"
    model_config: dict[str, Any] = field(default_factory=dict)
    quantizer: str = "fsq"
    quantizer_kwargs: dict[str, Any] = field(default_factory=lambda: {"levels": [8, 5, 5, 5]})
    data: str = "digits"
    image_size: int | None = None
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    recon_loss: str = "l1"
    gan: GANLossConfig = field(default_factory=GANLossConfig)
    seed: int = 0
    out_dir: str = "runs/tokenizer"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_images: int = 256
    proxy_tokenizer: str | None = None
    init_from: str | None = None
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.gan, dict):
            self.gan = GANLossConfig(**self.gan)
        self._check_loop_fields()
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"TrainConfig.recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")



@dataclass
class TrainResult:
    checkpoint: Path  # the final checkpoint folder (load it with load_tokenizer)
    metrics: dict[str, float]  # last logging window (train) and test-split evaluation (test_*)
    out_dir: Path


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_checkpoint_files(tmp: Path, step: int, tokenizer: Tokenizer, train_config: TrainConfig | None,
                            train_state: dict[str, Any] | None, metrics: dict[str, float] | None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    config = {"format": FORMAT, "version": FORMAT_VERSION, "model": tokenizer.registry_name,
              "tokenizer_config": tokenizer.config.to_dict(), "step": step,
              "token_shape": list(tokenizer.token_shape), "vocab_size": tokenizer.vocab_size,
              "pixel_range": list(tokenizer.pixel_range), "metrics": metrics or {},
              "train_config": train_config.to_dict() if train_config is not None else None}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    for p in tmp.iterdir():  # flush before the rename makes the folder visible
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(out_dir: Path, step: int, tokenizer: Tokenizer, train_config: TrainConfig | None,
                    train_state: dict[str, Any] | None, metrics: dict[str, float] | None = None,
                    keep: int = 2) -> Path:
    """Writes checkpoints/step_{step} atomically (temp folder, then rename) and points latest.json at it."""
    if not tokenizer.quantizer.registry_name:
        raise ValueError("save_checkpoint: the tokenizer's quantizer is not a registered quantizer, so the checkpoint "
                         "could not be rebuilt; register it with quantkit.quantizers.register_quantizer")
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_checkpoint_files(tmp, step, tokenizer, train_config, train_state, metrics)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint and latest.json stay as they were
        raise
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        old = root / f".old-step_{step:07d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _atomic_write_text(Path(out_dir) / "latest.json",
                       json.dumps({"checkpoint": str(final.relative_to(out_dir)), "step": step}))
    kept = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
    for p in kept[:-keep] if keep > 0 else []:
        if p != final:
            shutil.rmtree(p, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | os.PathLike, kind: str = "tokenizer") -> Path:
    """A run folder (its latest checkpoint) or a checkpoint folder -> the checkpoint folder (``kind`` names what
    was trained, for the error message)."""
    path = Path(path)
    if (path / "latest.json").is_file():
        return path / json.loads((path / "latest.json").read_text())["checkpoint"]
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    raise FileNotFoundError(f"{str(path)!r} is neither a {kind} run folder (with latest.json) nor a {kind} "
                            f"checkpoint folder (with config.json and model.safetensors)")


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    config = json.loads((ckpt / "config.json").read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{str(ckpt)!r} is not a quantkit tokenizer checkpoint (config.json format is "
                         f"{config.get('format')!r}, expected {FORMAT!r})")
    return config


def load_tokenizer(path: str | os.PathLike, map_location: str = "cpu") -> Tokenizer:
    """A trained tokenizer (eval mode) from a run folder or checkpoint folder."""
    from safetensors.torch import load_file

    from . import create_tokenizer

    ckpt = resolve_checkpoint(path)
    config = read_checkpoint_config(ckpt)
    tokenizer = create_tokenizer(config["model"], dict(config["tokenizer_config"]))
    load_weights(tokenizer, load_file(str(ckpt / "model.safetensors"), device=map_location), str(ckpt))
    return tokenizer.eval()


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Strict load with an error that names missing, unexpected and mismatched keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        def show(xs):
            return ", ".join(xs[:8]) + (f" ... ({len(xs)} in all)" if len(xs) > 8 else "")
        raise ValueError(f"{source} does not match a {type(model).__name__} built from its config: missing keys "
                         f"[{show(missing)}]; unexpected keys [{show(unexpected)}]; shape mismatches "
                         f"[{show(mismatched)}]. Was it written by another model or quantizer?")
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# the loop


class _LossModule(nn.Module):
    """What DDP wraps: forward = the tokenizer's training loss (so gradient sync covers exactly that graph)."""

    def __init__(self, tokenizer: Tokenizer, recon_loss: str):
        super().__init__()
        self.tokenizer, self.recon_loss = tokenizer, recon_loss

    def forward(self, images: Tensor):
        return self.tokenizer.training_loss(images, self.recon_loss)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2 ** 63)


def _lr_at(config: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def psnr(x01: Tensor, y01: Tensor) -> Tensor:
    """Mean PSNR (dB) over a batch of [0, 1] images."""
    mse = (x01.float() - y01.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()


def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    return rank, world, dev


def build_tokenizer_for(config: TrainConfig, channels: int, image_size: int) -> Tokenizer:
    from . import create_tokenizer

    overrides = {"image_size": image_size, "channels": channels, "quantizer": config.quantizer,
                 "quantizer_kwargs": dict(config.quantizer_kwargs), **config.model_config}
    extra = {}
    if config.proxy_tokenizer:
        extra["proxy_tokenizer"] = load_tokenizer(config.proxy_tokenizer)
    tokenizer = create_tokenizer(config.model, **overrides, **extra)
    if config.init_from:
        from safetensors.torch import load_file

        ckpt = resolve_checkpoint(config.init_from)
        state = load_file(str(ckpt / "model.safetensors"))
        load_weights(tokenizer, state, str(ckpt))
    return tokenizer


def train_tokenizer(config: TrainConfig | dict[str, Any], dataset=None, resume: bool = False,
                    callback: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Trains a tokenizer; returns the final checkpoint and metrics.

    dataset: a map-style dataset of [0, 1] images (default: ``config.data``'s train split). resume: continue from
    the run folder's latest checkpoint (without it, a folder that already holds a checkpoint is an error).
    callback(step, metrics) runs on rank 0 after every step (raising KeyboardInterrupt from it acts as Ctrl-C).
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    rank, world, device = _setup_distributed(config.device)
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of processes {world}")
    out_dir = Path(config.out_dir)
    has_checkpoint = (out_dir / "latest.json").is_file()
    if has_checkpoint and not resume:
        raise FileExistsError(f"{str(out_dir)!r} already holds a training run; pass --resume (resume=True) to "
                              f"continue it, or choose another output folder")
    torch.manual_seed(config.seed)
    builtin_data = dataset is None and config.data in ("digits", "patches")  # these have a test split
    data_name = config.data if dataset is None else f"a {type(dataset).__name__} of {len(dataset)} images"
    if dataset is None:
        dataset = load_dataset(config.data, "train", config.image_size, seed=config.seed)
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    first = stack_batch(dataset, [0])[0]
    tokenizer = build_tokenizer_for(config, dataset_channels(dataset), int(first.shape[-1])).to(device)
    params = [p for p in tokenizer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    gan = config.gan
    disc = disc_opt = perceptual = None
    if gan.enabled:
        disc = PatchDiscriminator(DiscriminatorConfig(tokenizer.config.channels, gan.ndf, gan.n_layers)).to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=config.lr * gan.disc_lr_scale, betas=config.betas,
                                     weight_decay=config.weight_decay)
        if gan.perceptual_weights:
            perceptual = PerceptualLoss(gan.perceptual_weights).to(device)
        if tokenizer.last_layer() is None and gan.adaptive_weight:
            raise ValueError(f"{tokenizer.registry_name}: no decoder last layer to compute the adaptive GAN weight "
                             f"from; set gan.adaptive_weight=false")
    start = 0
    if has_checkpoint:
        ckpt = resolve_checkpoint(out_dir)
        from safetensors.torch import load_file

        load_weights(tokenizer, load_file(str(ckpt / "model.safetensors"), device=str(device)), str(ckpt))
        state = torch.load(ckpt / "train_state.pt", map_location=device, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            if state.get("disc") is None:
                raise ValueError(f"{str(ckpt)!r} was trained without a discriminator; resume with gan.enabled=false")
            disc.load_state_dict(state["disc"])
            disc_opt.load_state_dict(state["disc_optimizer"])
        start = int(state["step"])
        _truncate_metrics(out_dir / "metrics.jsonl", start)
    loss_module: nn.Module = _LossModule(tokenizer, config.recon_loss)
    disc_module = disc
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        loss_module = DDP(loss_module, device_ids=ids, find_unused_parameters=_has_frozen_or_unused(tokenizer))
        if disc is not None:
            disc_module = DDP(disc, device_ids=ids)

    def train_state(step: int) -> dict[str, Any]:
        return {"step": step, "optimizer": opt.state_dict(), "disc": disc.state_dict() if disc else None,
                "disc_optimizer": disc_opt.state_dict() if disc_opt else None}

    log = _Logger(out_dir, tokenizer.vocab_size, rank == 0)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"[quantkit] training {config.model} + {config.quantizer} on {data_name}: token shape "
              f"{tokenizer.token_shape}, vocab {tokenizer.vocab_size}, {sum(p.numel() for p in params):,} trainable "
              f"parameters, {world} process(es); {gan.describe()}", file=sys.stderr)
    bar = None
    if rank == 0 and config.progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="train-tokenizer", dynamic_ncols=True)
    step = start
    tokenizer.train()
    try:
        while step < config.steps:
            g = torch.Generator().manual_seed(_step_seed(config.seed, step))
            idx = torch.randint(len(dataset), (config.batch_size,), generator=g)[rank::world]
            torch.manual_seed(_step_seed(config.seed, step) + 1)  # quantizer / dropout randomness of this step
            images01, _ = stack_batch(dataset, idx.tolist())
            images = tokenizer.from_unit(images01.to(device))
            lr = _lr_at(config, step)
            for group in opt.param_groups:
                group["lr"] = lr
            terms, out = loss_module(images)
            terms = dict(terms)
            gan_on = disc is not None and step >= gan.disc_start
            if perceptual is not None:
                terms["perceptual"] = gan.perceptual_weight * perceptual(out.reconstruction, images)
            if gan_on:
                disc.requires_grad_(False)
                g_loss = hinge_g_loss(disc(out.reconstruction))
                disc.requires_grad_(True)
                rec = terms.get("recon", sum(terms.values())) + terms.get("perceptual", 0.0)
                weight = (adaptive_weight(rec, g_loss, tokenizer.last_layer(), gan.disc_weight)
                          if gan.adaptive_weight else torch.tensor(gan.disc_weight))
                terms["gan"] = weight * g_loss
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            if gan_on:
                for group in disc_opt.param_groups:
                    group["lr"] = lr * gan.disc_lr_scale
                logits = disc_module(torch.cat([images, out.reconstruction.detach()]))
                real, fake = logits.chunk(2)
                d_loss = hinge_d_loss(real, fake)
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
                terms["disc"] = d_loss.detach()
            step += 1
            metrics = log.update(step, loss, terms, out, tokenizer, images, lr, force=step == config.steps,
                                 every=config.log_every)
            if bar is not None:
                bar.update(1)
                if metrics:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", psnr=f"{metrics['psnr']:.2f}",
                                    usage=f"{metrics['usage']:.1%}")
            if callback is not None and rank == 0:
                callback(step, metrics or {})
            if rank == 0 and (step % config.checkpoint_every == 0 or step == config.steps):
                save_checkpoint(out_dir, step, tokenizer, config, train_state(step), log.last, config.keep_checkpoints)
    except KeyboardInterrupt:
        if rank == 0:
            path = save_checkpoint(out_dir, step, tokenizer, config, train_state(step), log.last,
                                   config.keep_checkpoints)
            print(f"\n[quantkit] interrupted at step {step}; checkpoint saved to {path}; continue with --resume",
                  file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
    final_metrics = dict(log.last)
    ckpt = resolve_checkpoint(out_dir) if rank == 0 else out_dir
    if rank == 0 and config.eval_images > 0 and builtin_data:
        from .evaluate import evaluate_tokenizer

        test = load_dataset(config.data, "test", int(first.shape[-1]), seed=config.seed)
        report = evaluate_tokenizer(tokenizer.eval(), test, max_images=config.eval_images, batch_size=64,
                                    measure_speed=False)
        final_metrics.update({f"test_{k}": v for k, v in report.items() if isinstance(v, (int, float))})
        config_path = ckpt / "config.json"
        saved = json.loads(config_path.read_text())
        saved["metrics"] = final_metrics
        _atomic_write_text(config_path, json.dumps(saved, indent=2))
    if world > 1:
        dist.barrier()
    return TrainResult(checkpoint=ckpt, metrics=final_metrics, out_dir=out_dir)


def _has_frozen_or_unused(tokenizer: Tokenizer) -> bool:
    # TiTok stage 1 never uses the proxy VQGAN's decoder weights in the loss graph
    return tokenizer.registry_name == "titok"


class _Logger:
    """Averages loss terms, PSNR and codebook usage over each window of ``every`` steps (rank 0 writes)."""

    def __init__(self, out_dir: Path, vocab: int, active: bool):
        self.path, self.active, self.vocab = out_dir / "metrics.jsonl", active, vocab
        self.last: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.counts = torch.zeros(self.vocab, dtype=torch.int64)

    def update(self, step, loss, terms, out, tokenizer, images, lr, force, every) -> dict[str, float] | None:
        with torch.no_grad():
            p = float(psnr(tokenizer.to_unit(out.reconstruction.clamp(*tokenizer.pixel_range)),
                           tokenizer.to_unit(images)))
        values = {"loss": float(loss.detach()), "psnr": p,
                  **{k: float(v.detach() if isinstance(v, Tensor) else v) for k, v in terms.items()}}
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        self.counts.index_add_(0, out.indices.detach().reshape(-1).cpu(),
                               torch.ones(out.indices.numel(), dtype=torch.int64))
        if not (force or step % every == 0):
            return None
        probs = self.counts.double() / self.counts.sum().clamp_min(1)
        metrics = {"step": step, "lr": lr, **{k: v / self.n for k, v in self.sums.items()},
                   "usage": float((self.counts > 0).double().mean()),
                   "perplexity": float(torch.exp(-(probs * probs.clamp_min(1e-30).log()).sum()))}
        self.last = metrics
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        self._reset()
        return metrics


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops log lines after ``step`` (written after the checkpoint a resume starts from)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    _atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The logged metrics of a run folder (one dict per logged step)."""
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


# ----------------------------------------------------------------------------------------------------------------
# command line: quantkit train-tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON file with TrainConfig fields (flags given below override it)")
    parser.add_argument("--model", help="tokenizer: vqvae, vqgan, titok (default vqgan)")
    parser.add_argument("--quantizer", help="registered quantizer name (default fsq)")
    parser.add_argument("--quantizer-kwargs", type=json.loads, help='JSON, e.g. \'{"codebook_size": 1024}\'')
    parser.add_argument("--model-config", type=json.loads, help='JSON overrides of the tokenizer config, e.g. '
                                                                '\'{"embed_dim": 4}\'')
    parser.add_argument("--data", help="digits, patches, or an image folder (default digits)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", dest="out_dir", help="output folder (default runs/tokenizer)")
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--gan", action="store_true", help="train with the PatchGAN discriminator (VQGAN)")
    parser.add_argument("--disc-start", type=int, help="first step with the GAN loss on")
    parser.add_argument("--perceptual-weights", help="local TorchScript feature network for the perceptual loss "
                                                     "(off without it)")
    parser.add_argument("--proxy-tokenizer", help="trained quantkit VQGAN for TiTok's proxy-code (two-stage) head")
    parser.add_argument("--init-from", help="tokenizer checkpoint whose weights start this run")
    parser.add_argument("--device", help="cpu (default) or cuda")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    d: dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            d = json.load(f)
    for name in ("model", "quantizer", "quantizer_kwargs", "model_config", "data", "image_size", "steps",
                 "batch_size", "lr", "seed", "out_dir", "checkpoint_every", "proxy_tokenizer", "init_from", "device"):
        value = getattr(args, name)
        if value is not None:
            d[name] = value
    gan = dict(d.get("gan", {}))
    if args.gan:
        gan["enabled"] = True
    if args.disc_start is not None:
        gan["disc_start"] = args.disc_start
    if args.perceptual_weights:
        gan["perceptual_weights"] = args.perceptual_weights
    d["gan"] = gan
    if args.no_progress:
        d["progress"] = False
    return TrainConfig.from_dict(d)


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    try:
        result = train_tokenizer(config, resume=args.resume)
    except KeyboardInterrupt:
        raise SystemExit(130)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise SystemExit(f"quantkit train-tokenizer: error: {err}")
    if not dist.is_initialized() or dist.get_rank() == 0:
        shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
        print(json.dumps({"checkpoint": str(result.checkpoint), "metrics": shown}, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()


"""Training loop for tokenizers, shared by ``quantkit train-tokenizer`` and Python (:func:`train_tokenizer`).

    result = train_tokenizer(TrainConfig(model="vqgan", quantizer="fsq", quantizer_kwargs={"levels": [8, 5, 5, 5]},
                                         model_config={"embed_dim": 4}, data="digits", steps=1500, out_dir="runs/t"))
    tok = load_tokenizer(result.checkpoint)

The run folder (layout, atomic checkpoints with a manifest, resume from the newest good checkpoint, metrics log,
progress, Ctrl-C, DDP set-up) is :mod:`quantkit.training`'s; this module is what is particular to tokenizers: the
model, its losses (reconstruction, perceptual, PatchGAN) and what a tokenizer checkpoint records.

The one idea to hold: step s is a pure function of (weights, optimizer state, seed, s), so a run resumed from the
checkpoint of step s repeats exactly the losses of an uninterrupted one, even after a SIGKILL.

Under ``torchrun`` (WORLD_SIZE > 1) each process takes its slice of the global batch and DistributedDataParallel
averages the gradients (gloo on CPU, NCCL on CUDA); rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..data import DATASETS, dataset_channels, load_dataset, stack_batch
from ..training import (MetricsLog, RunConfig, atomic_write_text, load_tensors, load_train_state, load_weights,
                        lr_at, open_run, read_config, recorded_train_config, rewrite_config, say, setup_distributed,
                        step_indices, step_seed, wrap_ddp, write_checkpoint)
from ..training import read_metrics  # noqa: F401  (re-exported: quantkit.tokenizers.train.read_metrics)
from ..training import resolve_checkpoint as _resolve_checkpoint
from .base import Tokenizer
from .discriminator import DiscriminatorConfig, PatchDiscriminator
from .losses import GANLossConfig, PerceptualLoss, adaptive_weight, hinge_d_loss, hinge_g_loss

FORMAT = "quantkit-tokenizer"
FORMAT_VERSION = 2  # 2: manifest.json in every checkpoint, paths recorded relative to the run folder
_READABLE_VERSIONS = (1, 2)

# the shared run machinery under the names this module has always exported
_atomic_write_text, _lr_at, _step_seed, _setup_distributed = atomic_write_text, lr_at, step_seed, setup_distributed


@dataclass
class TrainConfig(RunConfig):
    """Everything a training run depends on (saved in every checkpoint's config.json).

    model_config: overrides of the tokenizer's config (e.g. {"embed_dim": 4, "ch": 64}); quantizer /
    quantizer_kwargs: the quantizer (any registered name); data: "digits", "patches" or an image folder;
    image_size: None = the dataset's default; proxy_tokenizer: a trained quantkit VQGAN run/checkpoint (TiTok
    head="proxy_codes"); init_from: a tokenizer checkpoint whose weights start this run (TiTok stage 2).
    """

    PATH_FIELDS = ("data", "proxy_tokenizer", "init_from")

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

    @classmethod
    def is_path(cls, name: str, value: Any) -> bool:
        return super().is_path(name, value) and not (name == "data" and value in DATASETS)


@dataclass
class TrainResult:
    checkpoint: Path  # the final checkpoint folder (load it with load_tokenizer)
    metrics: dict[str, float]  # last logging window (train) and test-split evaluation (test_*)
    out_dir: Path


# ----------------------------------------------------------------------------------------------------------------
# checkpoints (the folder mechanics are quantkit.training's; this is what a tokenizer checkpoint says)


def _checkpoint_config(tokenizer: Tokenizer, step: int, train_config: dict[str, Any] | None,
                       metrics: dict[str, float] | None) -> dict[str, Any]:
    layout = ({"continuous": True, "latent_shape": list(tokenizer.latent_shape),
               "latent_scale": float(tokenizer.latent_scale)} if tokenizer.continuous else
              {"token_shape": list(tokenizer.token_shape), "vocab_size": tokenizer.vocab_size})
    return {"format": FORMAT, "version": FORMAT_VERSION, "model": tokenizer.registry_name,
            "tokenizer_config": tokenizer.config.to_dict(), "step": step, **layout,
            "pixel_range": list(tokenizer.pixel_range), "metrics": metrics or {}, "train_config": train_config}


def _check_savable(tokenizer: Tokenizer) -> None:
    if not tokenizer.continuous and not tokenizer.quantizer.registry_name:
        raise ValueError("save_checkpoint: the tokenizer's quantizer is not a registered quantizer, so the checkpoint "
                         "could not be rebuilt; register it with quantkit.quantizers.register_quantizer")


def save_checkpoint(out_dir: Path, step: int, tokenizer: Tokenizer, train_config: TrainConfig | None,
                    train_state: dict[str, Any] | None, metrics: dict[str, float] | None = None,
                    keep: int = 2) -> Path:
    """Writes checkpoints/step_{step} atomically (with its manifest) and points latest.json at it."""
    _check_savable(tokenizer)
    recorded = train_config.recorded(out_dir) if train_config is not None else None
    return write_checkpoint(out_dir, step, tokenizer.state_dict(),
                            _checkpoint_config(tokenizer, step, recorded, metrics), train_state, keep)


def resolve_checkpoint(path: str | os.PathLike, kind: str = "tokenizer") -> Path:
    """A run folder (its latest checkpoint) or a checkpoint folder -> the verified checkpoint folder."""
    return _resolve_checkpoint(path, kind)


def read_checkpoint_config(path: str | os.PathLike, as_recorded: bool = False) -> dict[str, Any]:
    """A tokenizer checkpoint's config.json. The paths in its ``train_config`` are made usable from the working
    directory (recorded, they are relative to the run folder) unless ``as_recorded``."""
    ckpt = resolve_checkpoint(path)
    config = read_config(ckpt, FORMAT, "tokenizer")
    if config.get("version", 1) not in _READABLE_VERSIONS:
        raise ValueError(f"{str(path)!r} is a tokenizer checkpoint of format version {config.get('version')!r}; "
                         f"this quantkit reads versions {list(_READABLE_VERSIONS)}")
    if not as_recorded and config.get("version", 1) >= 2 and isinstance(config.get("train_config"), dict):
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
        config["train_config"] = TrainConfig.resolve_recorded_paths(config["train_config"], run_dir)
    return config


def load_tokenizer(path: str | os.PathLike, map_location: str = "cpu") -> Tokenizer:
    """A trained tokenizer (eval mode) from a run folder or checkpoint folder."""
    from . import create_tokenizer

    ckpt = resolve_checkpoint(path)
    config = read_checkpoint_config(ckpt)
    tokenizer = create_tokenizer(config["model"], dict(config["tokenizer_config"]))
    load_weights(tokenizer, load_tensors(ckpt, map_location), str(ckpt))
    return tokenizer.eval()


# ----------------------------------------------------------------------------------------------------------------
# the loop


class _LossModule(nn.Module):
    """What DDP wraps: forward = the tokenizer's training loss (so gradient sync covers exactly that graph)."""

    def __init__(self, tokenizer: Tokenizer, recon_loss: str):
        super().__init__()
        self.tokenizer, self.recon_loss = tokenizer, recon_loss

    def forward(self, images: Tensor):
        return self.tokenizer.training_loss(images, self.recon_loss)


def psnr(x01: Tensor, y01: Tensor) -> Tensor:
    """Mean PSNR (dB) over a batch of [0, 1] images."""
    mse = (x01.float() - y01.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()


def build_tokenizer_for(config: TrainConfig, channels: int, image_size: int) -> Tokenizer:
    from . import create_tokenizer, tokenizer_class

    quantizer = ({} if tokenizer_class(config.model).continuous else  # a KL-VAE has no quantizer
                 {"quantizer": config.quantizer, "quantizer_kwargs": dict(config.quantizer_kwargs)})
    overrides = {"image_size": image_size, "channels": channels, **quantizer, **config.model_config}
    extra = {}
    if config.proxy_tokenizer:
        extra["proxy_tokenizer"] = load_tokenizer(config.proxy_tokenizer)
    tokenizer = create_tokenizer(config.model, **overrides, **extra)
    if config.init_from:
        ckpt = resolve_checkpoint(config.init_from)
        load_weights(tokenizer, load_tensors(ckpt), str(ckpt))
    return tokenizer


def train_tokenizer(config: TrainConfig | dict[str, Any], dataset=None, resume: bool = False,
                    callback: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Trains a tokenizer; returns the final checkpoint and metrics.

    dataset: a map-style dataset of [0, 1] images (default: ``config.data``'s train split). resume: continue from
    the run folder's newest good checkpoint (without it, a folder that already holds a checkpoint is an error).
    callback(step, metrics) runs on rank 0 after every step (raising KeyboardInterrupt from it acts as Ctrl-C).
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    run = open_run(config.out_dir, resume, config.device, config.progress, config.batch_size)
    device, rank, world, out_dir = run.device, run.rank, run.world, run.out_dir
    torch.manual_seed(config.seed)
    builtin_data = dataset is None and config.data in DATASETS  # these have a test split
    data_name = config.data if dataset is None else f"a {type(dataset).__name__} of {len(dataset)} images"
    if dataset is None:
        dataset = load_dataset(config.data, "train", config.image_size, seed=config.seed)
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    first = stack_batch(dataset, [0])[0]
    tokenizer = build_tokenizer_for(config, dataset_channels(dataset), int(first.shape[-1])).to(device)
    _check_savable(tokenizer)
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
    if run.resume_from is not None:
        ckpt = run.resume_from
        read_checkpoint_config(ckpt)  # a generator's run folder is refused here, before any weight is loaded
        load_weights(tokenizer, load_tensors(ckpt, device), str(ckpt))
        state = load_train_state(ckpt, device)
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            if state.get("disc") is None:
                raise ValueError(f"{str(ckpt)!r} was trained without a discriminator; resume with gan.enabled=false")
            disc.load_state_dict(state["disc"])
            disc_opt.load_state_dict(state["disc_optimizer"])
        start = int(state["step"])
    loss_module = wrap_ddp(_LossModule(tokenizer, config.recon_loss), device, world, _has_frozen_or_unused(tokenizer))
    disc_module = wrap_ddp(disc, device, world) if disc is not None else None

    log = _Logger(run.metrics, 0 if tokenizer.continuous else tokenizer.vocab_size)
    run.prepare(start)
    if run.is_main:
        layout = (f"continuous latents {tokenizer.latent_shape}" if tokenizer.continuous else
                  f"+ {config.quantizer}: token shape {tokenizer.token_shape}, vocab {tokenizer.vocab_size}")
        say(f"training {config.model} {layout} on {data_name}, {sum(p.numel() for p in params):,} trainable "
            f"parameters, {world} process(es); {gan.describe()}")
    bar = run.progress(config.steps, start, "train-tokenizer")
    step = start

    def save() -> Path | None:
        if tokenizer.continuous and run.is_main:  # every checkpoint carries the scale of its own latents
            _measure_latent_scale(tokenizer, dataset)
        state = {"step": step, "optimizer": opt.state_dict(), "disc": disc.state_dict() if disc else None,
                 "disc_optimizer": disc_opt.state_dict() if disc_opt else None}
        return save_checkpoint(out_dir, step, tokenizer, config, state, log.last, config.keep_checkpoints) \
            if run.is_main else None

    tokenizer.train()
    with run.checkpoint_on_interrupt(save):
        while step < config.steps:
            idx = step_indices(config.seed, step, len(dataset), config.batch_size, rank, world)
            torch.manual_seed(step_seed(config.seed, step) + 1)  # quantizer / dropout randomness of this step
            images01, _ = stack_batch(dataset, idx.tolist())
            images = tokenizer.from_unit(images01.to(device))
            lr = lr_at(config, step)
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
            bar.update(1, **{k: metrics[k] for k in ("loss", "psnr", "usage", "kl_per_dim") if k in (metrics or {})})
            if callback is not None and rank == 0:
                callback(step, metrics or {})
            if step % config.checkpoint_every == 0 or step == config.steps:
                save()
    final_metrics = dict(log.last)
    ckpt = resolve_checkpoint(out_dir) if rank == 0 else out_dir
    if rank == 0 and config.eval_images > 0 and builtin_data:
        from .evaluate import evaluate_tokenizer

        test = load_dataset(config.data, "test", int(first.shape[-1]), seed=config.seed)
        report = evaluate_tokenizer(tokenizer.eval(), test, max_images=config.eval_images, batch_size=64,
                                    measure_speed=False)
        final_metrics.update({f"test_{k}": v for k, v in report.items() if isinstance(v, (int, float))})
        saved = read_checkpoint_config(ckpt, as_recorded=True)
        saved["metrics"] = final_metrics
        rewrite_config(ckpt, saved)
    run.barrier()
    return TrainResult(checkpoint=ckpt, metrics=final_metrics, out_dir=out_dir)


#: The latent scale factor of a continuous tokenizer is measured on at most this many training images.
LATENT_SCALE_IMAGES = 4096


def _measure_latent_scale(tokenizer, dataset, batch_size: int = 256) -> float:
    """latent_scale = 1 / std of the latents of the first LATENT_SCALE_IMAGES training images (all of digits).
    Deterministic (the posterior mean, no random draws), so it does not disturb an exact resume."""
    n = min(len(dataset), LATENT_SCALE_IMAGES)
    batches = (stack_batch(dataset, list(range(i, min(i + batch_size, n))))[0] for i in range(0, n, batch_size))
    return tokenizer.measure_latent_scale(batches)


def _has_frozen_or_unused(tokenizer: Tokenizer) -> bool:
    # TiTok stage 1 never uses the proxy VQGAN's decoder weights in the loss graph
    return tokenizer.registry_name == "titok"


class _Logger:
    """Averages loss terms, PSNR and codebook usage (vocab 0, a continuous tokenizer: its stats, e.g. KL per dim
    and active units) over each window of ``every`` steps (rank 0 writes)."""

    def __init__(self, log: MetricsLog, vocab: int):
        self.log, self.vocab = log, vocab
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
                  **{k: float(v.detach() if isinstance(v, Tensor) else v) for k, v in terms.items()},
                  **({k: float(v) for k, v in out.stats.items()} if not self.vocab else {})}
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        if self.vocab:
            self.counts.index_add_(0, out.indices.detach().reshape(-1).cpu(),
                                   torch.ones(out.indices.numel(), dtype=torch.int64))
        if not (force or step % every == 0):
            return None
        metrics = {"step": step, "lr": lr, **{k: v / self.n for k, v in self.sums.items()}}
        if self.vocab:
            probs = self.counts.double() / self.counts.sum().clamp_min(1)
            metrics.update(usage=float((self.counts > 0).double().mean()),
                           perplexity=float(torch.exp(-(probs * probs.clamp_min(1e-30).log()).sum())))
        self.last = metrics
        self.log.append(metrics)
        self._reset()
        return metrics


# ----------------------------------------------------------------------------------------------------------------
# command line: quantkit train-tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import json_object, nonnegative_int, positive_float, positive_int

    parser.add_argument("--config", help="JSON file with TrainConfig fields (flags given below override it)")
    parser.add_argument("--model", help="tokenizer: vqvae, vqgan, titok, softvq_vae, or klvae (continuous, no "
                                        "quantizer) (default vqgan)")
    parser.add_argument("--quantizer", help="registered quantizer name (default fsq)")
    parser.add_argument("--quantizer-kwargs", type=json_object, help='JSON, e.g. \'{"codebook_size": 1024}\'')
    parser.add_argument("--model-config", type=json_object, help='JSON overrides of the tokenizer config, e.g. '
                                                                 '\'{"embed_dim": 4}\'')
    parser.add_argument("--data", help="digits, patches, or an image folder (default digits)")
    parser.add_argument("--image-size", type=positive_int)
    parser.add_argument("--steps", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--lr", type=positive_float)
    parser.add_argument("--seed", type=nonnegative_int)
    parser.add_argument("--out", dest="out_dir", help="output folder (default runs/tokenizer)")
    parser.add_argument("--checkpoint-every", type=positive_int)
    parser.add_argument("--gan", action="store_true", help="train with the PatchGAN discriminator (VQGAN)")
    parser.add_argument("--disc-start", type=nonnegative_int, help="first step with the GAN loss on")
    parser.add_argument("--perceptual-weights", help="local TorchScript feature network for the perceptual loss "
                                                     "(off without it)")
    parser.add_argument("--proxy-tokenizer", help="trained quantkit VQGAN for TiTok's proxy-code (two-stage) head")
    parser.add_argument("--init-from", help="tokenizer checkpoint whose weights start this run")
    parser.add_argument("--device", help="cpu (default) or cuda")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest good "
                                                              "checkpoint (its recorded config is the default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress output (also QUANTKIT_PROGRESS=0)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from ..cli import CommandError, argument, read_json_file

    d: dict[str, Any] = read_json_file(args.config) if args.config else {}
    if args.resume:  # the run's own recorded config, under the file and the flags
        d = {**recorded_train_config(args.out_dir or d.get("out_dir") or TrainConfig.out_dir, TrainConfig), **d}
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
    try:
        config = TrainConfig.from_dict(d)
    except (TypeError, ValueError) as err:
        raise CommandError(f"{'--config ' + repr(args.config) + ': ' if args.config else ''}{err}") from None
    for flag, value in (("--proxy-tokenizer", config.proxy_tokenizer), ("--init-from", config.init_from)):
        if value:
            with argument(flag):
                read_checkpoint_config(value)
    return config


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    result = train_tokenizer(config, resume=args.resume)
    if not dist.is_initialized() or dist.get_rank() == 0:
        shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
        print(json.dumps({"checkpoint": str(result.checkpoint), "metrics": shown}, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()

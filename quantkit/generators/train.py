"""Training loop for generators, shared by ``quantkit train-generator`` and Python (:func:`train_generator`).

    result = train_generator(GeneratorTrainConfig(generator="maskgit", tokenizer="runs/tok", steps=1500,
                                                  out_dir="runs/maskgit"))
    model, meta = load_generator(result.checkpoint)

The dataset is tokenized *once* with the trained tokenizer and the token IDs are cached in the run folder
(``tokens.pt``, keyed by a fingerprint of the tokenizer's weights); training then never touches pixels. The run
folder is :mod:`quantkit.training`'s (atomic checkpoints with a manifest, exact resume from the newest good one,
metrics log, progress, Ctrl-C, torchrun / DDP with each rank taking a slice of the global batch), plus
``tokenizer/``: a copy of the tokenizer checkpoint the generator was trained on (hard links where possible), so
the run samples from wherever it is moved, and a later change to the tokenizer's own run cannot silently change it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..training import (RunConfig, copy_checkpoint, load_tensors, load_train_state, load_weights, lr_at, open_run,
                        read_config, read_metrics, recorded_train_config, resolve_recorded, say, step_indices, step_seed, wrap_ddp,
                        write_checkpoint)
from ..training import resolve_checkpoint as _resolve_checkpoint
from ._base import TokenGenerator
from ._registry import create_generator, generator_class

FORMAT = "quantkit-generator"
FORMAT_VERSION = 2  # 2: manifest.json in every checkpoint, the tokenizer copied into the run folder
#: Where a generator run keeps the copy of the tokenizer it was trained on (relative to the run folder).
TOKENIZER_COPY = "tokenizer"

__all__ = ["DIGITS_RECIPES", "GeneratorTrainConfig", "digits_recipe", "GeneratorTrainResult", "check_tokenizer_matches", "generator_for_tokenizer",
           "load_generator", "read_metrics", "tokenize_dataset", "train_generator"]


@dataclass
class GeneratorTrainConfig(RunConfig):
    """Everything a generator run depends on (saved in every checkpoint's config.json).

    tokenizer: a trained quantkit tokenizer (run folder or checkpoint folder). model_config: overrides of the
    generator's config (dim, depth, ...); vocab_size / token_shape / scales come from the tokenizer.
    """

    PATH_FIELDS = ("tokenizer",)

    generator: str = "maskgit"
    tokenizer: str = ""
    model_config: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # > 0: also keep an exponential moving average of the weights, ema = d * ema + (1 - d) * weights after every
    # step (Polyak & Juditsky 1992); checkpoints then hold the average (what sampling uses), train_state the weights
    ema_decay: float = 0.0
    seed: int = 0
    out_dir: str = "runs/generator"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 25
    device: str = "cpu"
    progress: bool = True
    sampling: dict[str, Any] = field(default_factory=dict)  # defaults for `quantkit sample`: steps, guidance, ...

    def __post_init__(self):
        self._check_loop_fields()
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) \
                or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"GeneratorTrainConfig.ema_decay must be a number in [0, 1), got {self.ema_decay!r}")
        if not self.tokenizer:
            raise ValueError("GeneratorTrainConfig.tokenizer: give the run folder of a trained quantkit tokenizer "
                             "(quantkit train-tokenizer --out DIR)")
        generator_class(self.generator)  # unknown name -> clear error now, not after tokenizing


@dataclass
class GeneratorTrainResult:
    checkpoint: Path  # final checkpoint folder (load it with load_generator)
    out_dir: Path
    metrics: dict[str, float]  # last logging window
    losses: list[tuple[int, float]]  # (step, mean loss) per logging window, whole run
    seconds: float  # wall time of this call's training loop
    num_parameters: int


#: Small models for the 16x16 ``digits`` (8x8 token grid; VAR scales 1-2-4-8; RQ 4x4x3) that train in minutes on a
#: 2-core CPU, with the sampling settings their evaluation uses. ``make demo`` and the benchmark start from these.
DIGITS_RECIPES: dict[str, dict[str, Any]] = {
    # MaskGIT: no label smoothing (its uniform 10% mass becomes stray tokens when sampling at temperature 1) and no
    # dropout (the masking already regularizes); choice temperature 20 (the paper's 4.5 is for 256 tokens: on 64 it
    # reveals the most confident, i.e. background, tokens first and the digits come out too plain); nucleus 0.95
    # drops the rare stray tokens; no guidance (it trades diversity for accuracy: FD / floor 3.2 at 0.5 vs 2.1 at 0,
    # 5,000 steps). It learns slowly: FD / floor 2.6 at 2,500 steps, 2.1 at 5,000, 1.8 at 8,000.
    "maskgit": dict(model_config=dict(dim=64, depth=3, heads=4, dropout=0.0, label_smoothing=0.0,
                                      choice_temperature=20.0), lr=2e-3, batch_size=32,
                    sampling=dict(steps=8, guidance=0.0, temperature=1.0, top_p=0.95)),
    # VAR memorizes the 1,437 training digits without dropout (loss 0.34 and FD / floor rising after 2,500 steps);
    # with dropout 0.1 it trains to 5,000 steps: FD / floor 1.8 with nucleus 0.9 and no guidance
    "var": dict(model_config=dict(dim=64, depth=3, heads=4, dropout=0.1), lr=2e-3, batch_size=32,
                sampling=dict(guidance=0.0, temperature=1.0, top_p=0.9)),
    "rq_transformer": dict(model_config=dict(dim=64, spatial_depth=3, depth_depth=1, heads=4), lr=2e-3,
                           batch_size=32, sampling=dict(guidance=1.0, temperature=1.0, top_k=32)),
    # the raster baseline at MaskGIT's parameter count (152,776 vs 163,264), as in the speed comparison
    "pixelcnn": dict(model_config=dict(channels=24, layers=6, kernel=5), lr=2e-3, batch_size=32,
                     sampling=dict(guidance=1.0, temperature=1.0, top_k=32)),
    # continuous, on the KL-VAE's 8x8x4 latents: MAR with a DDPM head or a flow head (2 noise draws per masked token
    # rather than MAR's 4: the head is most of a CPU step), and a DiT with MeanFlow sampled in one step. EMA 0.99,
    # not 0.999: at a few hundred steps a slower average still holds the untrained, zero-output start. The DDPM head
    # predicts v: with eps the first DDIM jump (abar 2.4e-9 at t = 999 to 6.8e-3) multiplies the noise error by
    # ~1,700 (measured: 10% accuracy at 400 steps), v reads x0 off directly.
    "mar_ddpm": dict(generator="mar", model_config=dict(
        dim=64, depth=3, heads=4, head_width=128, head_depth=3, diffusion_batch_mul=2, process="ddpm",
        process_kwargs=dict(num_timesteps=1000, default_steps=20, sampler="ddim", prediction="v")),
        lr=2e-3, batch_size=32, ema_decay=0.99, sampling=dict(steps=8, guidance=0.0)),
    "mar_flow": dict(generator="mar", model_config=dict(
        dim=64, depth=3, heads=4, head_width=128, head_depth=3, diffusion_batch_mul=2, process="flow",
        process_kwargs=dict(default_steps=16)),
        lr=2e-3, batch_size=32, ema_decay=0.99, sampling=dict(steps=8, guidance=0.0)),
    # MeanFlow with guidance in the training target (omega 2, section 4.2), meant to give guided samples in one
    # network evaluation. Measured on digits it did worse at this budget: 3,500 steps, 49% accuracy in 1 evaluation
    # (77% with sampling guidance 1), vs omega 1 at 2,500 steps: 84% in 1 evaluation, 98.5% with guidance 1 (2
    # evaluations, 7x MaskGIT's images/s); the guided target leans on a null branch this short run has not learned.
    "dit_meanflow": dict(generator="dit", model_config=dict(dim=96, depth=4, heads=4, patch_size=2,
                                                            process="meanflow",
                                                            process_kwargs=dict(guidance_omega=2.0)),
                         lr=2e-3, batch_size=32, ema_decay=0.99, sampling=dict(guidance=0.0)),
}


def digits_recipe(generator: str, tokenizer: str, out_dir: str, steps: int, **overrides: Any
                  ) -> GeneratorTrainConfig:
    """The :data:`DIGITS_RECIPES` config of ``generator`` for ``steps`` steps (keywords override fields). A recipe
    may name its generator class ("mar_flow" is MAR with the flow head)."""
    recipe = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DIGITS_RECIPES[generator].items()}
    return GeneratorTrainConfig(**{**recipe, "generator": recipe.get("generator", generator), "tokenizer": tokenizer, "out_dir": out_dir,
                                   "steps": steps, "warmup_steps": min(50, max(1, steps // 10)), **overrides})


# ----------------------------------------------------------------------------------------------------------------
# tokenizer <-> generator


def generator_for_tokenizer(name: str, tokenizer, num_classes: int, overrides: dict[str, Any] | None = None
                            ) -> TokenGenerator:
    """A generator whose vocabulary and token layout are the tokenizer's (a continuous generator: whose latent
    shape is the continuous tokenizer's)."""
    continuous = getattr(tokenizer, "continuous", False)
    if generator_class(name).continuous != continuous:
        raise ValueError(f"the {name!r} generator models {'latents' if generator_class(name).continuous else 'token IDs'}"
                         f" but this tokenizer emits {'latents (a continuous tokenizer)' if continuous else 'token IDs'}"
                         f"; pair MAR / DiT with a continuous tokenizer (klvae), the others with a discrete one")
    if continuous:
        return create_generator(name, **{**(overrides or {}), "latent_shape": tuple(tokenizer.latent_shape),
                                         "num_classes": num_classes})
    kwargs = {**(overrides or {}), "vocab_size": tokenizer.vocab_size, "token_shape": tuple(tokenizer.token_shape),
              "num_classes": num_classes}
    if name == "var":
        if not tokenizer.multiscale:
            raise ValueError("the VAR generator needs a tokenizer with the multi-scale residual quantizer "
                             "(quantizer 'multiscale_residual'); this one has "
                             f"{tokenizer.quantizer.registry_name!r}")
        kwargs["scales"] = tuple(int(h) for h, w in tokenizer.quantizer.sizes)
        kwargs.pop("token_shape")
    elif tokenizer.multiscale:
        raise ValueError(f"a multi-scale (VAR) tokenizer's tokens only suit the 'var' generator, not {name!r}")
    return create_generator(name, **kwargs)


def check_tokenizer_matches(model: TokenGenerator, tokenizer, source: str = "the tokenizer") -> None:
    """Raises a clear error when the tokenizer's vocabulary or token layout is not the generator's."""
    if getattr(model, "continuous", False) or getattr(tokenizer, "continuous", False):
        if not (getattr(model, "continuous", False) and getattr(tokenizer, "continuous", False)):
            raise ValueError(f"{source} and the {model.registry_name} generator do not match: one is continuous "
                             f"(latents), the other discrete (token IDs)")
        if tuple(tokenizer.latent_shape) != tuple(model.latent_shape):
            raise ValueError(f"{source} emits latents of shape {tuple(tokenizer.latent_shape)} but the "
                             f"{model.registry_name} generator models {tuple(model.latent_shape)}")
        return
    if tokenizer.vocab_size != model.vocab_size:
        raise ValueError(f"{source} has a vocabulary of {tokenizer.vocab_size} codes but the {model.registry_name} "
                         f"generator was trained on {model.vocab_size}; use the tokenizer the generator was trained "
                         f"with, or retrain the generator on this one")
    if tuple(tokenizer.token_shape) != tuple(model.cfg.token_shape):
        raise ValueError(f"{source} emits tokens of shape {tuple(tokenizer.token_shape)} but the "
                         f"{model.registry_name} generator models {tuple(model.cfg.token_shape)}")


def _fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def tokenize_dataset(tokenizer, dataset, batch_size: int = 256, device: str | torch.device = "cpu"
                     ) -> tuple[Tensor, Tensor]:
    """Every image of a map-style dataset -> (ids (N, *token_shape) int64, labels (N,) int64), on CPU."""
    from ..data import stack_batch

    tokenizer = tokenizer.eval().to(device)
    ids, labels = [], []
    for start in range(0, len(dataset), batch_size):
        images01, y = stack_batch(dataset, list(range(start, min(start + batch_size, len(dataset)))))
        ids.append(tokenizer.encode(tokenizer.from_unit(images01.to(device))).cpu())
        labels.append(torch.as_tensor(y, dtype=torch.long))
    return torch.cat(ids), torch.cat(labels)


def _tokens_key(tokenizer, config: GeneratorTrainConfig) -> dict[str, str]:
    return {"tokenizer": _fingerprint(tokenizer), "data": config.data}


def _cached_tokens(out_dir: Path, tokenizer, config: GeneratorTrainConfig) -> tuple[Tensor, Tensor]:
    """Token IDs of the training split: the run folder's cache when it is of this tokenizer, else computed."""
    from ..data import load_dataset

    path = out_dir / "tokens.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable cache is recomputed
            cached = {}
        if cached.get("key") == _tokens_key(tokenizer, config):
            return cached["ids"], cached["labels"]
    dataset = load_dataset(config.data, "train", tokenizer.image_shape[-1], seed=config.seed)
    return tokenize_dataset(tokenizer, dataset, device=config.device)


def _save_tokens(out_dir: Path, tokenizer, config: GeneratorTrainConfig, ids: Tensor, labels: Tensor) -> None:
    """Caches the token IDs in the run folder (atomically), unless the cache already holds them."""
    path, key = out_dir / "tokens.pt", _tokens_key(tokenizer, config)
    if path.is_file():
        try:
            if torch.load(path, map_location="cpu", weights_only=True).get("key") == key:
                return
        except Exception:
            pass
    tmp = path.with_name(f".tokens.pt.tmp-{os.getpid()}")
    torch.save({"key": key, "ids": ids, "labels": labels}, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints (the folder mechanics are quantkit.training's; this is what a generator checkpoint says)


def save_checkpoint(out_dir: Path, step: int, model: TokenGenerator, config: GeneratorTrainConfig,
                    train_state: dict[str, Any] | None, metrics: dict[str, float] | None = None) -> Path:
    """Writes checkpoints/step_{step} atomically (with its manifest) and points latest.json at it. The checkpoint
    names the run's own copy of the tokenizer (``tokenizer/`` beside ``checkpoints/``)."""
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "generator": model.registry_name,
            "generator_config": model.config_dict(), "step": step, "tokenizer": TOKENIZER_COPY,
            "metrics": metrics or {}, "train_config": config.recorded(out_dir, tokenizer=TOKENIZER_COPY)}
    return write_checkpoint(out_dir, step, model.state_dict(), meta, train_state, config.keep_checkpoints)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A generator run folder (its latest checkpoint) or checkpoint folder -> the verified checkpoint folder."""
    return _resolve_checkpoint(path, kind="generator")


def resolve_checkpoint_of_tokenizer(path: str | os.PathLike) -> Path:
    return _resolve_checkpoint(path, kind="tokenizer")


def load_generator(path: str | os.PathLike, map_location: str = "cpu") -> tuple[TokenGenerator, dict[str, Any]]:
    """(generator in eval mode, its checkpoint's config.json) from a run folder or a checkpoint folder."""
    ckpt = resolve_checkpoint(path)
    meta = read_config(ckpt, FORMAT, "generator")
    model = create_generator(meta["generator"], **meta["generator_config"])
    load_weights(model, load_tensors(ckpt, map_location), str(ckpt))
    return model.to(map_location).eval(), meta


def generator_tokenizer_path(path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Where the tokenizer that the generator run or checkpoint ``path`` names is now: the run's own copy,
    recorded relative to the run folder (runs from before the copy recorded a path relative to the working
    directory, which is tried second)."""
    ckpt = resolve_checkpoint(path)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    found = resolve_recorded(meta["tokenizer"], run_dir)
    if not found.exists():
        raise FileNotFoundError(f"the tokenizer that {str(path)!r} was trained on ({meta['tokenizer']!r}) is not "
                                f"in its run folder {str(run_dir)!r}; give one with --tokenizer")
    return found


# ----------------------------------------------------------------------------------------------------------------
# the loop


class _LossModule(nn.Module):
    """What DDP wraps: forward = the generator's training loss."""

    def __init__(self, model: TokenGenerator):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        return self.model.loss(ids, labels)


def _saved_model_and_state(model: TokenGenerator, ema, opt, step: int) -> tuple[nn.Module, dict[str, Any]]:
    """What a checkpoint holds: the weights to sample with (the average in an EMA run) and the state to resume."""
    state: dict[str, Any] = {"step": step, "optimizer": opt.state_dict()}
    if ema is None:
        return model, state
    state["weights"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state["ema_updates"] = int(ema.n_averaged)
    return ema.module, state


def train_generator(config: GeneratorTrainConfig | dict[str, Any], resume: bool = False,
                    callback: Callable[[int, float], None] | None = None) -> GeneratorTrainResult:
    """Trains a generator on the token IDs of ``config.tokenizer``; returns the final checkpoint.

    resume: continue from the run folder's latest checkpoint (without it, a folder that already holds a
    checkpoint is an error). callback(step, loss) runs on rank 0 after every step.
    """
    from ..tokenizers import load_tokenizer

    if isinstance(config, dict):
        config = GeneratorTrainConfig.from_dict(config)
    run = open_run(config.out_dir, resume, config.device, config.progress, config.batch_size)
    device, rank, world, out_dir = run.device, run.rank, run.world, run.out_dir
    tokenizer_ckpt = resolve_checkpoint_of_tokenizer(config.tokenizer)
    tokenizer = load_tokenizer(tokenizer_ckpt)
    own_copy = out_dir / TOKENIZER_COPY
    if run.resume_from is not None:
        meta = read_config(run.resume_from, FORMAT, "generator")
        if meta.get("generator") != config.generator:
            raise ValueError(f"{str(out_dir)!r} holds a {meta.get('generator')!r} run, not {config.generator!r}")
        if own_copy.is_dir() and _fingerprint(load_tokenizer(own_copy)) != _fingerprint(tokenizer):
            raise ValueError(f"--tokenizer {str(config.tokenizer)!r} is not the tokenizer this run was trained on "
                             f"(its copy is {str(own_copy)!r}); resume with that one")
    ids, labels = _cached_tokens(out_dir, tokenizer, config)
    torch.manual_seed(config.seed)
    num_classes = int(labels.max()) + 1
    model = generator_for_tokenizer(config.generator, tokenizer, num_classes, config.model_config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    ema = None
    if config.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    start = 0
    if run.resume_from is not None:
        ckpt = run.resume_from
        saved = load_tensors(ckpt, device)  # the average, in an EMA run
        state = load_train_state(ckpt, device)
        if (ema is None) != ("weights" not in state):
            raise ValueError(f"{str(out_dir)!r} was trained with ema_decay "
                             f"{'> 0' if 'weights' in state else '= 0'}; resume it with the same setting")
        load_weights(model, state["weights"] if ema is not None else saved, str(ckpt))
        if ema is not None:
            load_weights(ema.module, saved, str(ckpt))
            ema.n_averaged.fill_(int(state["ema_updates"]))
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    run.prepare(start)
    if run.is_main:
        _save_tokens(out_dir, tokenizer, config, ids, labels)
        if not own_copy.is_dir():  # the run carries the tokenizer it is trained on
            copy_checkpoint(tokenizer_ckpt, own_copy)
    del tokenizer
    losses = [(int(m["step"]), float(m["loss"])) for m in run.metrics.read()] if start else []
    loss_module = wrap_ddp(_LossModule(model), device, world)
    if run.is_main:
        vocab = "continuous latents" if model.continuous else f"vocab {model.vocab_size}"
        say(f"training {config.generator} on {len(ids)} tokenized {config.data} images: token shape "
            f"{tuple(ids.shape[1:])}, {vocab}, {model.num_parameters():,} parameters, "
            f"{world} process(es)")
    bar = run.progress(config.steps, start, f"train-{config.generator}")
    ids, labels = ids.to(device), labels.to(device)
    step, window, last = start, [], {}

    def save() -> Path | None:
        saved_model, train_state = _saved_model_and_state(model, ema, opt, step)
        return save_checkpoint(out_dir, step, saved_model, config, train_state, last) if run.is_main else None

    t0 = time.perf_counter()
    model.train()
    with run.checkpoint_on_interrupt(save):
        while step < config.steps:
            idx = step_indices(config.seed, step, len(ids), config.batch_size, rank, world).to(device)
            torch.manual_seed(step_seed(config.seed, step) + 1 + rank)  # masks, label dropout of this step
            lr = lr_at(config, step)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = loss_module(ids[idx], labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            window.append(float(loss.detach()))
            if step % config.log_every == 0 or step == config.steps:
                last = {"step": step, "loss": sum(window) / len(window), "lr": lr}
                losses.append((step, last["loss"]))
                window = []
                run.metrics.append(last)
            bar.update(1, **({"loss": last["loss"]} if last else {}))
            if callback is not None and rank == 0:
                callback(step, window[-1] if window else float(loss.detach()))
            if step % config.checkpoint_every == 0 or step == config.steps:
                save()
    seconds = time.perf_counter() - t0
    run.barrier()
    return GeneratorTrainResult(checkpoint=resolve_checkpoint(out_dir), out_dir=out_dir, metrics=last,
                                losses=losses, seconds=seconds, num_parameters=model.num_parameters())


# ----------------------------------------------------------------------------------------------------------------
# command line: quantkit train-generator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import json_object, nonnegative_float, nonnegative_int, positive_float, positive_int

    parser.add_argument("--config", help="JSON file with GeneratorTrainConfig fields (flags below override it)")
    parser.add_argument("--generator", help="maskgit, var, rq_transformer, pixelcnn (token IDs) or mar, dit "
                                            "(continuous latents of a klvae tokenizer) (default maskgit)")
    parser.add_argument("--tokenizer", help="run folder of a trained quantkit tokenizer (with --resume: default "
                                            "the copy the run carries)")
    parser.add_argument("--model-config", type=json_object, help='JSON overrides, e.g. \'{"dim": 128, "depth": 4}\'')
    parser.add_argument("--data", help="dataset to tokenize (default digits)")
    parser.add_argument("--steps", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--lr", type=positive_float)
    parser.add_argument("--ema-decay", type=nonnegative_float, help="keep an EMA of the weights with this decay "
                                                                    "(0: off)")
    parser.add_argument("--seed", type=nonnegative_int)
    parser.add_argument("--out", dest="out_dir", help="output folder (default runs/generator)")
    parser.add_argument("--checkpoint-every", type=positive_int)
    parser.add_argument("--device", help="cpu (default) or cuda")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest good "
                                                              "checkpoint (its recorded config is the default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress output (also QUANTKIT_PROGRESS=0)")


def run(args: argparse.Namespace) -> None:
    from ..cli import CommandError, argument, read_json_file
    from ..tokenizers.train import read_checkpoint_config

    d: dict[str, Any] = read_json_file(args.config) if args.config else {}
    if args.resume:  # the run's own recorded config (its tokenizer copy included), under the file and the flags
        out = args.out_dir or d.get("out_dir") or GeneratorTrainConfig.out_dir
        d = {**recorded_train_config(out, GeneratorTrainConfig), **d}
    for name in ("generator", "tokenizer", "model_config", "data", "steps", "batch_size", "lr", "ema_decay", "seed",
                 "out_dir", "checkpoint_every", "device"):
        if getattr(args, name) is not None:
            d[name] = getattr(args, name)
    if args.no_progress:
        d["progress"] = False
    if d.get("tokenizer"):
        with argument("--tokenizer"):
            read_checkpoint_config(d["tokenizer"])  # missing, corrupt or not a tokenizer: say so before any work
    try:
        config = GeneratorTrainConfig.from_dict(d)
    except (TypeError, ValueError) as err:
        raise CommandError(f"{'--config ' + repr(args.config) + ': ' if args.config else ''}{err}") from None
    result = train_generator(config, resume=args.resume)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({"checkpoint": str(result.checkpoint), "loss": result.metrics.get("loss"),
                          "seconds": round(result.seconds, 1)}, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()

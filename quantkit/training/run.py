"""One training run: its folder, resume point, metrics log, progress, checkpoints, Ctrl-C and DDP set-up.

A run folder holds
    checkpoints/step_XXXXXXX/   model.safetensors, config.json, train_state.pt, manifest.json (written last)
    latest.json                 which checkpoint is newest (replaced atomically)
    metrics.jsonl               one JSON line per logged step
    ...                         whatever the trainer keeps beside them (a token cache, a copied tokenizer)

Every path a run records is relative to the run folder, so the folder can be moved, copied to another machine or
used from any working directory.

The one idea to hold: the trainer owns the model and the step; :class:`TrainingRun` owns everything on disk. A
run is killed at any moment (SIGKILL included) without harm: checkpoints appear atomically and carry a manifest,
the metrics log is cut back to the checkpoint a resume starts from (a half-written last line included), and
``open_run(..., resume=True)`` resumes from the newest checkpoint that verifies, saying in one line which newer
ones it skipped.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .checkpoints import (atomic_write_text, is_run_folder, newest_good_checkpoint, remove_stale_temporaries,
                          write_checkpoint)
from .progress import Progress


def say(message: str) -> None:
    """One line of training news on stderr."""
    print(f"[quantkit] {message}", file=sys.stderr, flush=True)


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); under ``torchrun`` (WORLD_SIZE > 1) joins the process group
    (gloo on CPU, NCCL on CUDA) and puts each rank on its LOCAL_RANK GPU."""
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


def wrap_ddp(module: nn.Module, device: torch.device, world: int, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` inside DistributedDataParallel when there is more than one process (gradients averaged)."""
    if world <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)


class MetricsLog:
    """``metrics.jsonl``: one JSON object with a "step" per line, appended by rank 0."""

    def __init__(self, path: str | os.PathLike, active: bool = True):
        self.path, self.active = Path(path), active

    def append(self, metrics: dict[str, Any]) -> None:
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
                f.flush()

    def read(self) -> list[dict[str, Any]]:
        return read_metrics_file(self.path)

    def truncate(self, step: int) -> None:
        """Keeps the lines up to ``step`` (what a resume from step ``step`` will not write again)."""
        if self.active and self.path.is_file():
            kept = [m for m in self.read() if m["step"] <= step]
            atomic_write_text(self.path, "".join(json.dumps(m) + "\n" for m in kept))


def read_metrics_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete line of a metrics log (a line cut off by a crash is not one)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged metrics of a run folder (one dict per logged step)."""
    return read_metrics_file(Path(out_dir) / "metrics.jsonl")


class TrainingRun:
    """A run folder seen by one process. Build it with :func:`open_run`.

    resume_from: the checkpoint folder to load (None: start from step 0). is_main: rank 0, the one that writes.
    """

    def __init__(self, out_dir: Path, resume_from: Path | None, rank: int, world: int, device: torch.device,
                 progress: bool):
        self.out_dir, self.resume_from = out_dir, resume_from
        self.rank, self.world, self.device = rank, world, device
        self.is_main = rank == 0
        self.show_progress = progress
        self.metrics = MetricsLog(out_dir / "metrics.jsonl", active=self.is_main)
        self.bar: Progress | None = None

    def prepare(self, start_step: int) -> None:
        """Creates the folder (rank 0), clears what an interrupted write left, and cuts the metrics log back to
        ``start_step`` (the step of the checkpoint resumed from, or 0)."""
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out_dir)
            if start_step == 0:
                self.metrics.path.unlink(missing_ok=True)
            else:
                self.metrics.truncate(start_step)

    def progress(self, total: int, initial: int, desc: str) -> Progress:
        """The stage's progress display (silent on ranks other than 0)."""
        self.bar = Progress(total=total, initial=initial, desc=desc, enabled=self.show_progress and self.is_main)
        return self.bar

    def save(self, step: int, weights: dict[str, torch.Tensor], config: dict[str, Any],
             train_state: dict[str, Any] | None, keep: int) -> Path | None:
        """Writes the checkpoint of ``step`` on rank 0 (other ranks return None)."""
        if not self.is_main:
            return None
        return write_checkpoint(self.out_dir, step, weights, config, train_state, keep)

    @contextmanager
    def checkpoint_on_interrupt(self, save: Callable[[], Path | None]) -> Iterator[None]:
        """Around the loop: Ctrl-C (KeyboardInterrupt) saves a checkpoint via ``save()`` and says how to continue;
        the progress display is closed whatever happens."""
        try:
            yield
        except KeyboardInterrupt:
            if self.is_main:
                if self.bar is not None:
                    self.bar.close()
                path = save()
                print(file=sys.stderr)
                say(f"interrupted; checkpoint saved to {path}; continue with --resume")
            raise
        finally:
            if self.bar is not None:
                self.bar.close()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def recorded_train_config(out_dir: str | os.PathLike, config_class) -> dict[str, Any]:
    """The training config that the run in ``out_dir`` recorded in its newest good checkpoint, with its paths made
    usable from the working directory and without ``out_dir`` ({} when there is no such checkpoint). A resumed
    command starts from it, so ``--resume`` needs no flag but ``--out``."""
    ckpt = newest_good_checkpoint(out_dir)
    if ckpt is None:
        return {}
    try:
        recorded = json.loads((ckpt / "config.json").read_text()).get("train_config")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    d = config_class.resolve_recorded_paths(recorded, out_dir)
    d.pop("out_dir", None)
    return d


def open_run(out_dir: str | os.PathLike, resume: bool, device: str = "cpu", progress: bool = True,
             batch_size: int | None = None) -> TrainingRun:
    """Joins the process group if there is one and checks the run folder, writing nothing yet.

    Without ``resume`` a folder that already holds a run is an error; with it, the run resumes from the newest
    checkpoint that verifies (a fresh start when there is none). ``batch_size``: checked to split evenly over the
    processes."""
    rank, world, dev = setup_distributed(device)
    if batch_size is not None and batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output folder {str(out_dir)!r} is a file")
    resume_from = None
    if is_run_folder(out_dir):
        if not resume:
            raise FileExistsError(f"{str(out_dir)!r} already holds a training run; pass --resume (resume=True) to "
                                  f"continue it, or choose another output folder")
        resume_from = newest_good_checkpoint(out_dir, report=say if rank == 0 else None)
        if resume_from is None:
            raise FileNotFoundError(f"{str(out_dir)!r} holds no checkpoint that verifies; nothing to resume")
        if rank == 0:
            say(f"resuming from {resume_from.relative_to(out_dir).as_posix()}")
    return TrainingRun(out_dir, resume_from, rank, world, dev, progress)

"""Checkpoint folders: written atomically with a manifest, verified before they are trusted.

A checkpoint is a folder ``checkpoints/step_XXXXXXX/`` holding ``model.safetensors`` (the weights to use),
``config.json`` (what built them, which trainer wrote it, the training config, metrics), optionally
``train_state.pt`` (optimizer and the rest of what resuming needs), and ``manifest.json``: the byte count and
SHA-256 of every other file, written last.

The one idea to hold: a checkpoint is trusted only when its manifest matches. The files are written and fsynced
in a hidden temporary folder that is renamed into place, so a crash during a write leaves at most a hidden folder
(removed on the next start); a later truncation or corruption (a copy cut short, a disk error) fails the
manifest check, and resuming falls back to the newest checkpoint that passes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "quantkit-checkpoint-manifest"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
STEP_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, truncated or corrupted; the message names the file."""


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``path`` so that a reader sees either the old or the new content, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path, step: int) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir())}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    with open(folder / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=2))
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(run_dir: str | os.PathLike, step: int, weights: dict[str, Tensor], config: dict[str, Any],
                     train_state: dict[str, Any] | None = None, keep: int = 2,
                     extra_files: dict[str, bytes] | None = None) -> Path:
    """Writes ``run_dir/checkpoints/step_{step}`` atomically, points ``latest.json`` at it, keeps the newest
    ``keep`` (0: all). Re-saving a step whose checkpoint exists and verifies keeps the existing one (the state
    of a step is a function of the step: Ctrl-C right after a periodic save)."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:07d}"
    if final.is_dir() and checkpoint_problem(final) is None:
        _point_latest(run_dir, final, step)
        return final
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        for p in tmp.iterdir():  # on disk before the manifest vouches for them
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _write_manifest(tmp, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint and latest.json stay as they were
        raise
    if final.exists():  # a bad checkpoint of the same step: set it aside, then replace it
        _discard(final)
    os.replace(tmp, final)
    _point_latest(run_dir, final, step)
    if keep > 0:
        for p in list_checkpoints(run_dir)[keep:]:
            if p != final:
                _discard(p)
    return final


def _point_latest(run_dir: Path, final: Path, step: int) -> None:
    atomic_write_text(run_dir / "latest.json", json.dumps({"checkpoint": final.relative_to(run_dir).as_posix(),
                                                           "step": step}))


def _discard(folder: Path) -> None:
    """Renames a checkpoint out of sight first (one atomic step), then deletes it."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temporaries(run_dir: str | os.PathLike) -> None:
    """Deletes what an interrupted write or prune left behind (hidden ``.tmp-*`` / ``.trash-*`` folders)."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoint folders, newest step first (verified or not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]), reverse=True)


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """None when the checkpoint folder is complete and matches its manifest, else what is wrong (one line).

    A folder without a manifest is accepted only as a checkpoint from before manifests (config.json version 1)
    whose files are all present."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{str(folder)!r} does not exist"
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        try:
            version = json.loads((folder / CONFIG).read_text()).get("version")
        except (OSError, ValueError, AttributeError):
            version = None
        if version == 1 and (folder / WEIGHTS).is_file():
            return None
        return f"{str(folder)!r} has no {MANIFEST} (an interrupted write or delete)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{str(manifest_path)!r} is not a readable checkpoint manifest"
    for name in (WEIGHTS, CONFIG):
        if name not in files:
            return f"{str(folder)!r}: the manifest lists no {name}"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{str(path)!r} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{str(path)!r} is truncated or overwritten ({size:,} bytes, the manifest says {want['bytes']:,})"
        if _sha256(path) != want["sha256"]:
            return f"{str(path)!r} is corrupted (its SHA-256 does not match the manifest)"
    return None


def verify_checkpoint(folder: str | os.PathLike) -> Path:
    """The folder, or CheckpointError naming what is wrong with it."""
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(problem)
    return Path(folder)


def newest_good_checkpoint(run_dir: str | os.PathLike, report=None) -> Path | None:
    """The newest checkpoint of the run that verifies (None if there is none); ``report(line)`` hears about each
    newer one that was skipped and why."""
    for folder in list_checkpoints(run_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        if report is not None:
            report(f"skipping checkpoint {folder.name}: {problem}")
    return None


def is_run_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "latest.json").is_file() or bool(list_checkpoints(path))


def resolve_checkpoint(path: str | os.PathLike, kind: str = "tokenizer") -> Path:
    """A run folder (its latest checkpoint) or a checkpoint folder -> the verified checkpoint folder (``kind``
    names what was trained, for the error message)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist (expected a {kind} run folder or checkpoint folder)")
    if (path / "latest.json").is_file():
        try:
            ckpt = path / json.loads((path / "latest.json").read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{str(path / 'latest.json')!r} is not readable; the run's checkpoints are in "
                                  f"{str(path / 'checkpoints')!r}") from None
    elif (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        ckpt = path
    else:
        raise FileNotFoundError(f"{str(path)!r} is neither a {kind} run folder (with latest.json) nor a {kind} "
                                f"checkpoint folder (with config.json and model.safetensors)")
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        good = newest_good_checkpoint(path) if ckpt != path else None
        hint = f"; the newest good checkpoint is {str(good)!r}" if good is not None else ""
        raise CheckpointError(problem + hint)
    return ckpt


def read_config(ckpt: str | os.PathLike, expected_format: str, kind: str) -> dict[str, Any]:
    """A verified checkpoint's config.json, checked to be of ``expected_format``."""
    ckpt = Path(ckpt)
    try:
        config = json.loads((ckpt / CONFIG).read_text())
    except ValueError as err:
        raise CheckpointError(f"{str(ckpt / CONFIG)!r} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != expected_format:
        found = config.get("format") if isinstance(config, dict) else None
        raise ValueError(f"{str(ckpt)!r} is not a quantkit {kind} checkpoint (config.json format is {found!r}, "
                         f"expected {expected_format!r})")
    return config


def load_tensors(ckpt: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The weights of a checkpoint folder; an unreadable file is a CheckpointError naming it."""
    from safetensors.torch import load_file

    path = Path(ckpt) / WEIGHTS
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own SafetensorError for a bad header
        raise CheckpointError(f"could not read {str(path)!r} ({type(err).__name__}: {err}); is the file "
                              f"complete?") from None


def load_train_state(ckpt: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(ckpt) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing: this checkpoint holds weights only and cannot be resumed")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"could not read {str(path)!r} ({type(err).__name__}: {err})") from None


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


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, files=(WEIGHTS, CONFIG),
                    config: dict[str, Any] | None = None) -> Path:
    """Copies a verified checkpoint's ``files`` into ``dst`` (hard links where the file system allows: checkpoint
    files are never rewritten in place) with a fresh manifest, atomically; returns ``dst``. ``config``: write
    this config.json instead of the source's."""
    src, dst = verify_checkpoint(src), Path(dst)
    tmp = dst.with_name(f".tmp-{dst.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in files:
            if name == CONFIG and config is not None:
                (tmp / CONFIG).write_text(json.dumps(config, indent=2))
                continue
            if not (src / name).is_file():
                continue
            try:
                os.link(src / name, tmp / name)
            except OSError:
                shutil.copy2(src / name, tmp / name)
        step = json.loads((tmp / CONFIG).read_text()).get("step", 0)
        _write_manifest(tmp, int(step))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        _discard(dst)
    os.replace(tmp, dst)
    return dst


def rewrite_config(ckpt: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Replaces a checkpoint's config.json (e.g. to add evaluation metrics) and its manifest together: the new
    folder is built beside it and swapped in."""
    ckpt = Path(ckpt)
    return copy_checkpoint(ckpt, ckpt, files=(WEIGHTS, CONFIG, TRAIN_STATE), config=config)

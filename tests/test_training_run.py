"""quantkit.training: checkpoints verify against their manifest, resume takes the newest good one, the metrics log
survives a torn last line, progress is a few plain lines off a terminal, and run folders move."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantkit.training import (CheckpointError, MetricsLog, Progress, checkpoint_problem, list_checkpoints,
                               newest_good_checkpoint, open_run, resolve_checkpoint, write_checkpoint)

ROOT = Path(__file__).resolve().parents[1]


def _write(run, step, keep=0):
    return write_checkpoint(run, step, {"w": torch.full((4,), float(step))}, {"format": "test", "step": step},
                            {"step": step}, keep=keep)


def test_a_checkpoint_verifies_until_a_byte_of_it_changes(tmp_path):
    ckpt = _write(tmp_path, 1)
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                      "train_state.pt"]
    assert checkpoint_problem(ckpt) is None
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert "corrupted" in checkpoint_problem(ckpt)
    weights.write_bytes(bytes(data[:10]))
    assert "truncated" in checkpoint_problem(ckpt)
    with pytest.raises(CheckpointError, match="truncated"):
        resolve_checkpoint(tmp_path)


def test_resume_skips_a_corrupted_newest_checkpoint_and_says_so(tmp_path, capsys):
    for step in (2, 4):
        _write(tmp_path, step)
    (tmp_path / "checkpoints" / "step_0000004" / "train_state.pt").write_bytes(b"torn")
    assert newest_good_checkpoint(tmp_path).name == "step_0000002"
    run = open_run(tmp_path, resume=True)
    assert run.resume_from.name == "step_0000002"
    err = capsys.readouterr().err
    assert "skipping checkpoint step_0000004" in err and "train_state.pt" in err
    with pytest.raises(FileExistsError, match="--resume"):
        open_run(tmp_path, resume=False)
    with pytest.raises(CheckpointError, match="newest good checkpoint is .*step_0000002"):
        resolve_checkpoint(tmp_path)  # loading names the good one rather than using it silently


def test_an_interrupted_write_leaves_only_a_hidden_folder_that_the_next_start_removes(tmp_path, monkeypatch):
    import safetensors.torch

    _write(tmp_path, 1)

    def dies(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(OSError):
        _write(tmp_path, 2)
    monkeypatch.undo()
    (tmp_path / "checkpoints" / ".tmp-step_0000002-1").mkdir()  # what a SIGKILL mid-write leaves
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]
    run = open_run(tmp_path, resume=True)
    run.prepare(1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]


def test_keep_prunes_old_checkpoints_and_resaving_a_step_keeps_the_good_copy(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000002"]
    before = (tmp_path / "checkpoints" / "step_0000003" / "manifest.json").stat().st_ino
    _write(tmp_path, 3, keep=2)
    assert (tmp_path / "checkpoints" / "step_0000003" / "manifest.json").stat().st_ino == before
    assert json.loads((tmp_path / "latest.json").read_text()) == {"checkpoint": "checkpoints/step_0000003",
                                                                   "step": 3}


def test_metrics_log_drops_a_torn_last_line_and_lines_after_the_resume_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 5):
        log.append({"step": step, "loss": 1.0 / step})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "lo')  # SIGKILL in the middle of a write
    assert [m["step"] for m in log.read()] == [1, 2, 3, 4]
    log.truncate(2)
    assert [m["step"] for m in log.read()] == [1, 2] and log.path.read_text().endswith("\n")


def test_progress_off_a_terminal_is_one_line_per_tenth_with_rate_eta_and_loss():
    stream, now = io.StringIO(), [0.0]
    bar = Progress(total=200, desc="train-x", stream=stream, clock=lambda: now[0])
    for step in range(200):
        now[0] += 0.5
        bar.update(1, loss=1.0 / (step + 1))
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10, lines
    assert lines[0].startswith("[quantkit] train-x 20/200 (10%) 2 it/s ETA 1:30 loss=0.05")
    assert lines[-1].startswith("[quantkit] train-x 200/200 (100%)") and "ETA" not in lines[-1]


def test_progress_also_reports_every_m_seconds_on_a_slow_stage():
    stream, now = io.StringIO(), [0.0]
    bar = Progress(total=1000, desc="slow", stream=stream, every_seconds=60, clock=lambda: now[0])
    for _ in range(50):  # 5% of the stage in 250 s: no 10% boundary, four 60-second marks
        now[0] += 5.0
        bar.update(1)
    assert len(stream.getvalue().splitlines()) == 4


def test_progress_is_silenced_by_the_flag_and_by_the_environment(monkeypatch):
    stream = io.StringIO()
    bar = Progress(total=10, desc="x", stream=stream, enabled=False)
    for _ in range(10):
        bar.update(1)
    monkeypatch.setenv("QUANTKIT_PROGRESS", "0")
    bar = Progress(total=10, desc="x", stream=stream)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert stream.getvalue() == ""


# ----------------------------------------------------------------------------------------------------------------
# run folders are self-contained


def _cli(args, cwd, **env):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "quantkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=environment)


@pytest.mark.slow  # four Python processes (about 30 s on 2 cores)
def test_a_moved_tokenizer_and_generator_pair_samples_and_resumes_from_another_directory(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    tok = ["train-tokenizer", "--model", "vqvae", "--quantizer", "fsq", "--quantizer-kwargs", '{"levels": [3, 3]}',
           "--model-config", '{"hidden": 8, "res_hidden": 4, "num_res_blocks": 1, "embed_dim": 2}', "--steps", "2",
           "--batch-size", "8", "--out", "runs/tok", "--no-progress"]
    assert _cli(tok, work).returncode == 0
    gen = ["train-generator", "--tokenizer", "runs/tok", "--model-config", '{"dim": 16, "depth": 1, "heads": 2}',
           "--steps", "2", "--batch-size", "8", "--out", "runs/gen", "--no-progress"]
    result = _cli(gen, work)
    assert result.returncode == 0, result.stderr[-2000:]
    recorded = json.loads((work / "runs/gen/checkpoints/step_0000002/config.json").read_text())
    assert recorded["tokenizer"] == "tokenizer" and recorded["train_config"]["out_dir"] == "."
    assert not any(str(tmp_path) in json.dumps(v) for v in recorded.values())  # no absolute path anywhere

    moved = tmp_path / "elsewhere" / "pair"
    moved.parent.mkdir()
    shutil.move(str(work / "runs"), str(moved))
    shutil.rmtree(work)  # nothing is left where it was trained
    other = tmp_path / "other_cwd"
    other.mkdir()
    result = _cli(["sample", "--generator", str(moved / "gen"), "--labels", "0,1", "--count", "2", "--out", "s"],
                  other)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (other / "s" / "samples.png").stat().st_size > 100
    # and it resumes there, with the tokenizer it carries (no --tokenizer needed)
    result = _cli(["train-generator", "--out", str(moved / "gen"), "--steps", "3", "--resume", "--no-progress"],
                  other)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((moved / "gen" / "latest.json").read_text())["step"] == 3

"""The command line at its surface: bad input is one line naming the argument (exit 2, no traceback, the run
folder untouched), `--debug` shows the traceback, `import quantkit` exposes its submodules lazily, and a training
run SIGKILLed at any moment resumes to the losses of an uninterrupted run, bit for bit."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOK = ["--model", "vqvae", "--quantizer", "fsq", "--quantizer-kwargs", '{"levels": [3, 3]}', "--model-config",
       '{"hidden": 8, "res_hidden": 4, "num_res_blocks": 1, "embed_dim": 2}', "--batch-size", "8", "--no-progress"]


def _env(**extra):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "QUANTKIT_PROGRESS": "0", **extra}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "quantkit", *args], capture_output=True, text=True, timeout=300,
                          env=_env(), cwd=cwd)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert _cli("train-tokenizer", *TOK, "--steps", "2", "--out", str(root / "tok")).returncode == 0
    result = _cli("train-generator", "--tokenizer", str(root / "tok"), "--model-config",
                  '{"dim": 16, "depth": 1, "heads": 2}', "--steps", "2", "--batch-size", "8", "--out",
                  str(root / "gen"), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def _one_line_error(result, *needles):
    assert result.returncode in (1, 2), (result.returncode, result.stderr[-2000:])  # 2: argparse, 1: later checks
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


CASES = {
    "negative steps": (["train-tokenizer", "--steps", "-5"], ["--steps", "positive integer", "'-5'"]),
    "malformed JSON flag": (["train-tokenizer", "--quantizer-kwargs", "{levels: 3"], ["--quantizer-kwargs",
                                                                                      "not valid JSON"]),
    "missing generator path": (["sample", "--generator", "no/such/run"], ["--generator", "does not exist"]),
    "tokenizer run as generator": (["sample", "--generator", "{tok}"], ["--generator",
                                                                       "not a quantkit generator checkpoint"]),
    "out-of-range label": (["sample", "--generator", "{gen}", "--labels", "3,12"], ["--labels", "12"]),
    "bad top-p": (["sample", "--generator", "{gen}", "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    "generator run as tokenizer": (["train-generator", "--tokenizer", "{gen}", "--out", "{new}"],
                                   ["--tokenizer", "not a quantkit tokenizer checkpoint"]),
    "missing tokenizer to evaluate": (["eval-tokenizer", "no/such/tok"], ["does not exist"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_the_argument_and_leaves_runs_untouched(runs, case):
    args, needles = CASES[case]
    before = _snapshot(runs)
    for name in ("tok", "gen", "new"):
        args = [a.replace("{" + name + "}", str(runs / name)) for a in args]
    _one_line_error(_cli(*args, cwd=runs), *needles)
    assert _snapshot(runs) == before and not (runs / "new").exists()


def test_malformed_config_file_and_corrupted_checkpoint_are_one_line(runs, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": 3,')
    _one_line_error(_cli("train-tokenizer", "--config", str(bad)), "--config", "not valid JSON")
    bad.write_text('{"steps": -5}')
    _one_line_error(_cli("train-tokenizer", "--config", str(bad), "--out", str(tmp_path / "x")), "--config",
                    "steps must be a positive int")
    copy = tmp_path / "gen"
    subprocess.run(["cp", "-r", str(runs / "gen"), str(copy)], check=True)
    weights = copy / "checkpoints" / "step_0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    line = _one_line_error(_cli("sample", "--generator", str(copy)), "--generator", "model.safetensors",
                           "truncated")
    assert "SafetensorError" not in line
    debug = _cli("sample", "--generator", str(copy), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr


def test_import_quantkit_exposes_submodules_lazily():
    code = ("import sys, quantkit; assert 'quantkit.metrics' not in sys.modules; "
            "print(quantkit.metrics.CodebookUsage.__name__, quantkit.testing.check_quantizer.__name__, "
            "quantkit.tokenizers.load_tokenizer.__name__, quantkit.generators.create_generator.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.stdout.split() == ["CodebookUsage", "check_quantizer", "load_tokenizer", "create_generator"], out.stderr


# ----------------------------------------------------------------------------------------------------------------
# SIGKILL at any moment, then --resume

# A real training process that SIGKILLs itself: after a given step, or in the middle of writing a checkpoint
# (after half of train_state.pt is on disk).
_KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    where, at = sys.argv[1], int(sys.argv[2])
    if where == "checkpoint":
        real = torch.save
        def torn(obj, f, *a, **k):
            if isinstance(obj, dict) and obj.get("step") == at:
                with open(f, "wb") as out:
                    out.write(b"half")
                    out.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *a, **k)
        torch.save = torn
    else:
        import quantkit.tokenizers.train as T
        real_update = T._Logger.update
        def update(self, step, *a, **k):
            out = real_update(self, step, *a, **k)
            if step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        T._Logger.update = update
    from quantkit.cli import main
    main(sys.argv[3:])
""")


def _losses(run):
    return [(m["step"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow  # seven short training processes
def test_sigkilled_runs_resume_to_the_uninterrupted_loss_curve_bitwise(tmp_path):
    config = tmp_path / "every_step.json"
    config.write_text('{"log_every": 1}')
    args = ["train-tokenizer", "--config", str(config), *TOK, "--steps", "6", "--checkpoint-every", "2", "--seed", "3"]
    assert _cli(*args, "--out", str(tmp_path / "full")).returncode == 0
    full = _losses(tmp_path / "full")
    assert [s for s, _ in full] == [1, 2, 3, 4, 5, 6]
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    for where, at in (("step", 3), ("step", 5), ("checkpoint", 4)):
        run = tmp_path / f"{where}{at}"
        cmd = [sys.executable, str(script), where, str(at), *args, "--out", str(run)]
        killed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        resumed = _cli(*args, "--out", str(run), "--resume")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert _losses(run) == full, where  # the same floats, not merely close
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    # the newest checkpoint corrupted on disk: reported in one line, resumed from the one before it
    run = tmp_path / "corrupt"
    assert _cli(*args, "--steps", "4", "--out", str(run)).returncode == 0
    state = run / "checkpoints" / "step_0000004" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:50])
    resumed = _cli(*args, "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping checkpoint step_0000004" in resumed.stderr and "resuming from checkpoints/step_0000002" in \
        resumed.stderr
    assert _losses(run) == full


def test_check_quantizer_names_the_failing_invariant_with_its_counterexample(tmp_path):
    user = tmp_path / "my_quant.py"
    user.write_text(textwrap.dedent("""
        from quantkit.quantizers import VectorQuantizer
        class Leaky(VectorQuantizer):
            def forward(self, x, mask=None):
                if not self.training:
                    self.codebook.weight.data.add_(1e-3)  # eval moves the codebook: not pure
                return super().forward(x, mask=mask)
    """))
    result = _cli("check-quantizer", f"{user}:Leaky", "--kwargs", '{"dim": 4, "codebook_size": 8}')
    assert result.returncode == 1, result.stderr[-2000:]
    assert "FAIL eval_purity: Leaky: eval changes no parameter or buffer: 'codebook.weight' changed" in result.stdout
    assert "ok   output_contract" in result.stdout and "failing: eval_purity" in result.stdout
    good = _cli("check-quantizer", "quantkit.quantizers:FSQ", "--kwargs", '{"levels": [3, 3]}')
    assert good.returncode == 0 and "12 of 12 invariants hold" in good.stdout
    _one_line_error(_cli("check-quantizer", "no_such_module:X"), "cannot import 'no_such_module'")


def test_bench_reports_speed_usage_and_a_histogram_for_a_users_codebook_and_a_trained_run(runs, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((64, 8)).astype(np.float32)
    codebook[:8] += 100.0  # eight codes far from every latent: dead
    np.save(tmp_path / "codebook.npy", codebook)
    np.save(tmp_path / "z.npy", rng.standard_normal((2000, 8)).astype(np.float32))
    result = _cli("bench", str(tmp_path / "codebook.npy"), "--latents", str(tmp_path / "z.npy"), "--repeats", "1",
                  "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["dead_codes"] >= 8 and sum(report["counts"]) == 2000
    assert {r["method"] for r in report["search"]} >= {"quantkit nearest_codeword", "torch chunked matmul + argmin"}
    assert all(r["agreement"] is None or r["agreement"] > 0.99 for r in report["search"])
    assert (tmp_path / "out" / "usage.png").stat().st_size > 1000
    run = _cli("bench", str(runs / "tok"), "--num-latents", "256", "--repeats", "1", "--out", str(tmp_path / "r"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "bench.json").read_text())["codebook"][0] == 9  # FSQ levels [3, 3]
    _one_line_error(_cli("bench", str(tmp_path / "z.npy"), "--latents", str(tmp_path / "nope.npy")), "--latents",
                    "does not exist")

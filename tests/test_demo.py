"""`quantkit demo --quick`: the whole pipeline runs end to end and writes its report."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_writes_a_report_with_every_generator(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "quantkit", "demo", "--quick", "--no-progress", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("report.md")
    report = (out / "report.md").read_text()
    assert "| maskgit |" in report and "| var |" in report
    for picture in ("samples.png", "losses.png", "codebook_usage.png"):
        assert (out / picture).stat().st_size > 1000
    rows = json.loads((out / "report.json").read_text())["generators"]
    assert [r["generator"] for r in rows] == ["maskgit", "var"]
    assert all(0.0 <= r["conditional_accuracy"] <= 1.0 and r["frechet_distance"] >= 0 for r in rows)


def test_demo_rejects_zero_steps(tmp_path):
    result = subprocess.run([sys.executable, "-m", "quantkit", "demo", "--quick", "--generator-steps", "0",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--generator-steps must be at least 1" in result.stderr

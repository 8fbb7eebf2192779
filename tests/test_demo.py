"""`quantkit demo --quick`: the whole pipeline runs end to end, both tracks (discrete: MaskGIT and VAR on token IDs;
continuous: MAR on a KL-VAE's latents), and writes its report."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_writes_a_report_with_every_generator_of_both_tracks(tmp_path):
    from PIL import Image

    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "quantkit", "demo", "--quick", "--no-progress", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("report.md")
    report = (out / "report.md").read_text()
    assert "| discrete | maskgit |" in report and "| discrete | var |" in report
    assert "| continuous | mar_flow | kl |" in report and "continuous track" in report
    for picture in ("samples.png", "losses.png", "codebook_usage.png"):
        assert (out / picture).stat().st_size > 1000
    data = json.loads((out / "report.json").read_text())
    rows = data["generators"]
    assert [(r["generator"], r["track"]) for r in rows] == [("maskgit", "discrete"), ("var", "discrete"),
                                                             ("mar_flow", "continuous")]
    assert all(0.0 <= r["conditional_accuracy"] <= 1.0 and r["frechet_distance"] >= 0 for r in rows)
    assert rows[2]["evaluations_per_image"] > 8 and data["track_seconds"]["continuous"] > 0
    # the continuous run is a KL-VAE with MAR on its latents, trained by the shared trainers
    assert json.loads((out / "tokenizer_kl" / "latest.json").read_text())["step"] == 10
    generator = json.loads((out / "mar_flow" / "latest.json").read_text())
    assert generator["step"] == 10
    # samples: one row of real digits and one per generator, discrete and continuous side by side in one grid
    with Image.open(out / "samples.png") as grid, Image.open(out / "losses.png"):
        assert round(grid.size[1] / grid.size[0] * 20) == 4  # 20 columns (classes 0-9 twice), 4 rows


def test_demo_rejects_zero_steps(tmp_path):
    result = subprocess.run([sys.executable, "-m", "quantkit", "demo", "--quick", "--generator-steps", "0",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--generator-steps must be at least 1" in result.stderr

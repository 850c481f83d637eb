"""The momentum study script runs end to end at a tiny size, resumes a half-done study, and
writes its table and plots."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def study(tmp_path, *args):
    proc = subprocess.run(
        [sys.executable, "experiments/momentum_study.py", "--small", "--epochs=2",
         "--probe_every=1", "--linear_epochs=1", f"--out={tmp_path}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_momentum_study_smoke_resumes_and_reports(tmp_path):
    methods = "--methods=MoCo v2,EMA from layer4"
    study(tmp_path, methods, "--seeds=0")
    first = json.loads((tmp_path / "runs" / "moco_v2" / "seed0" / "study.json").read_text())
    # A second call with one more seed runs only the new runs: the finished ones are kept.
    out = study(tmp_path, methods, "--seeds=0,1")
    assert "2 runs to do" in out
    again = json.loads((tmp_path / "runs" / "moco_v2" / "seed0" / "study.json").read_text())
    assert again["wall_seconds"] == first["wall_seconds"]

    results = json.loads((tmp_path / "results.json").read_text())
    summary = results["summary"]
    assert list(summary) == ["MoCo v2", "EMA from layer4"]
    for name, s in summary.items():
        assert s["knn_k200"]["n"] == 2 and 0.0 <= s["knn_k200"]["mean"] <= 1.0
        assert s["knn_k200"]["std"] >= 0.0 and 0.0 <= s["linear"]["mean"] <= 1.0
        assert len(s["knn_curve"]) == 2
        # One value per block: the stem, 8 ResNet-18 blocks and the projector output.
        assert s["blocks"][0] == "relu" and s["blocks"][-1] == "projector"
        assert len(s["fluctuation_cv"]) == len(s["blocks"]) == 10
        assert all(v["mean"] >= 0 for v in s["fluctuation_cv"] + s["fluctuation_rel_change"])
    runs = results["runs"]["EMA from layer4"]
    assert {r["seed"] for r in runs} == {0, 1} and runs[0]["method"] == "EMA from layer4"
    assert "| MoCo v2 (n=2) |" in (tmp_path / "results.md").read_text()
    for png in ("knn.png", "fluctuation.png", "fluctuation_rel_change.png"):
        assert (tmp_path / png).stat().st_size > 1000

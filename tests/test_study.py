"""The experiment scripts run end to end at a tiny size: the momentum study resumes a half-done
study, times the methods for the equal-time table and writes its table and plots; the quickstart
sweep applies each variant's overrides, skips finished runs and writes its table and plot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name, *args):
    proc = subprocess.run([sys.executable, f"experiments/{name}", "--small", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def study(tmp_path, *args):
    return script("momentum_study.py", "--epochs=2", "--probe_every=1", "--linear_epochs=1",
                  f"--out={tmp_path}", *args)


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

    # Without step timings the equal-time table falls back to the runs' own wall times.
    assert not any(s["equal_time_basis"]["timed_idle"] for s in summary.values())
    study(tmp_path, methods, "--seeds=0,1", "--time", "--time_steps=2")
    results = json.loads((tmp_path / "results.json").read_text())
    budget = results["equal_time_budget_seconds"]
    for name, s in results["summary"].items():
        timing = json.loads((tmp_path / "timing" / f"{name.lower().replace(' ', '_')}.json")
                            .read_text())
        assert s["equal_time_basis"] == {"seconds": timing["seconds_per_step"] * 8,
                                         "timed_idle": True}  # 2 epochs x 4 steps
    assert budget == min(s["equal_time_basis"]["seconds"] for s in results["summary"].values())
    assert "measured by `--time` on an idle machine" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_quickstart_sweep_applies_overrides_skips_finished_runs_and_reports(tmp_path):
    def sweep(*args):
        return script("quickstart_sweep.py", "--epochs=2", "--knn_every=1", f"--out={tmp_path}",
                      "--variants=quickstart (MoCo v2),T 0.2", *args)

    sweep("--parallel=2")
    assert "0 runs to do" in sweep()  # both finished: nothing is trained again
    runs = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["knn_top1"] for r in runs] == sorted((r["knn_top1"] for r in runs), reverse=True)
    by_name = {r["variant"]: r for r in runs}
    assert by_name["T 0.2"]["overrides"] == {"moco.temperature": 0.2}
    # The same seed and data: only the temperature differs, so the losses do.
    assert by_name["T 0.2"]["final_loss"] != by_name["quickstart (MoCo v2)"]["final_loss"]
    assert [e["epoch"] for e in by_name["T 0.2"]["knn_per_epoch"]] == [1, 2]
    table = (tmp_path / "sweep.md").read_text()
    assert "| T 0.2 | 0 | 2 |" in table and "| quickstart (MoCo v2) | 0 | 2 |" in table
    assert (tmp_path / "knn.png").stat().st_size > 1000

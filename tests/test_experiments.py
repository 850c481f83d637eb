"""The experiment scripts run end to end at a tiny size: the momentum study resumes a half-done
study, times the methods for the equal-time table and writes its table and plots; the quickstart
sweep applies each variant's overrides, skips finished runs and writes its table and plot; the
convolution bound counts the kernels a step runs."""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import conv_bound  # noqa: E402


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
        assert all(v["mean"] >= 0 for key in ("fluctuation_cv", "fluctuation_detrended_cv",
                                              "fluctuation_rel_change") for v in s[key])
    runs = results["runs"]["EMA from layer4"]
    assert {r["seed"] for r in runs} == {0, 1} and runs[0]["method"] == "EMA from layer4"
    assert "| MoCo v2 (n=2) |" in (tmp_path / "results.md").read_text()
    for png in ("knn.png", "fluctuation.png"):
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


def test_fluctuation_measures_separate_drift_from_jitter():
    sys.argv = sys.argv[:1]  # the study's absl flags are parsed lazily; none are needed here
    from experiments import momentum_study

    steps = np.arange(20.0)
    drift = 1.0 + 0.1 * steps  # a norm that only grows: no fluctuation around its trend
    jitter = 2.0 + 0.2 * (-1.0) ** steps  # a flat norm alternating +-10%
    run = {"probes": [{"norm": [d, j], "rel_change": [0.5, 0.25]} for d, j in zip(drift, jitter)]}
    cv, detrended, rel = momentum_study.fluctuation(run)
    assert cv[0] == pytest.approx(drift.std() / drift.mean()) and cv[0] > 0.2
    assert detrended[0] == pytest.approx(0.0, abs=1e-12)
    # Around a 5-probe moving average (2 +- 0.04), the alternating norm is off by 0.16 in
    # absolute value: 8% of its mean.
    assert detrended[1] == pytest.approx(0.16 / 2.0, rel=1e-6)
    assert rel == [0.5, 0.25]
    short = {"probes": run["probes"][:2]}  # fewer probes than the window: no error
    assert momentum_study.fluctuation(short)[1] == [0.0, 0.0]


@pytest.mark.slow
def test_quickstart_sweep_applies_overrides_skips_finished_runs_and_reports(tmp_path):
    def sweep(*args):
        return script("quickstart_sweep.py", "--epochs=2", "--knn_every=1", f"--out={tmp_path}",
                      "--variants=quickstart,T 0.2", *args)

    sweep("--parallel=2")
    assert "0 runs to do" in sweep()  # both finished: nothing is trained again
    runs = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["knn_top1"] for r in runs] == sorted((r["knn_top1"] for r in runs), reverse=True)
    by_name = {r["variant"]: r for r in runs}
    assert by_name["T 0.2"]["overrides"] == {"moco.temperature": 0.2}
    # The same seed and data: only the temperature differs, so the losses do.
    assert by_name["T 0.2"]["final_loss"] != by_name["quickstart"]["final_loss"]
    assert [e["epoch"] for e in by_name["T 0.2"]["knn_per_epoch"]] == [1, 2]
    table = (tmp_path / "sweep.md").read_text()
    assert "| T 0.2 | 0 | 2 |" in table and "| quickstart | 0 | 2 |" in table
    assert (tmp_path / "knn.png").stat().st_size > 1000
    # --curve plots one finished run (a train.py workdir) next to its results.json.
    workdir = tmp_path / "runs" / "t_0.2" / "seed0"
    script("quickstart_sweep.py", f"--curve={workdir}")
    assert (workdir / "knn.png").stat().st_size > 1000


def test_conv_bound_counts_two_forwards_one_backward_and_no_image_gradient():
    times = {"a": (1.0, 10.0, 100.0), "b": (1000.0, 10000.0, 100000.0)}
    calls = []

    def time_kernels(shape):
        calls.append(shape)
        return times[shape]

    # The first conv takes the image: forward x2 (query, key) + filter gradient only.
    total = conv_bound.bound_step_seconds([("a", False), ("b", True), ("b", True)], time_kernels)
    assert total == (2 * 1 + 100) + 2 * (2 * 1000 + 10000 + 100000)
    assert calls == ["a", "b"]  # each distinct shape timed once


def test_conv_bound_of_both_frameworks_and_the_share_a_step_reaches(tmp_path):
    from moco_tf import train_lib

    tiny = ["--size", "8", "--batch", "8", "--queue", "64", "--backbone", "small_cnn"]
    has_torch = importlib.util.find_spec("torchvision") is not None
    step_json = tmp_path / "step.json"
    step_json.write_text(json.dumps({"fit_fp32_img_s": 10.0, "torch_eager_img_s": 5.0}))
    out = conv_bound.run(tiny + ["--repeats", "2", f"--step-json={step_json}", "--frameworks",
                                 "tf,torch" if has_torch else "tf", "--torch-threads", "1"])
    args = conv_bound.step.add_step_args(argparse.ArgumentParser()).parse_args(tiny)
    convs = conv_bound.tf_conv_shapes(train_lib.build_model(conv_bound.step.moco_config(args)))
    bound = out["tf_conv_bound"]
    assert bound["convs"] == len(convs) >= 2 and not convs[0][1] and convs[1][1]
    h, w, c_in, *_ = convs[0][0]
    assert c_in == 3 and h >= 8 and w >= 8  # the stem sees the (padded) RGB image
    assert math.isfinite(bound["img_s"]) and bound["img_s"] > 0
    assert bound["fit_fp32_pct_of_bound"] == pytest.approx(100 * 10.0 / bound["img_s"], abs=0.05)
    assert "backbone_only_pct_of_bound" not in bound  # not in the step JSON
    if has_torch:
        # The reference's ResNet-18 with the CIFAR stem: 20 convs, the stem's on the RGB image.
        torch_bound = out["torch_conv_bound"]
        assert torch_bound["convs"] == 20 and torch_bound["img_s"] > 0
        assert torch_bound["torch_eager_pct_of_bound"] == pytest.approx(
            100 * 5.0 / torch_bound["img_s"], abs=0.05)

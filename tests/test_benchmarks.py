"""The benchmark scripts run at tiny sizes and report what they promise (no timing assertions)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--size", "8", "--batch", "8", "--steps", "2", "--warmup", "1", "--queue", "64",
        "--backbone", "small_cnn"]
REQUIRED = ("fit_fp32_img_s", "fit_bf16_img_s", "backbone_only_img_s", "full_ema_img_s",
            "projector_momentum_img_s", "peak_memory_mb")


def _load(name):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _has_torch():
    return importlib.util.find_spec("torch") is not None and \
        importlib.util.find_spec("torchvision") is not None


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


step = _load("step")
pipeline = _load("pipeline")
profile_step = _load("profile_step")


def test_step_in_process_reports_required_keys_and_overhead():
    out = step.run(TINY + ["--in-process", "--modes",
                           "fit_fp32,fit_bf16,backbone_only,projector_momentum"])
    for key in REQUIRED:
        assert _positive(out[key]), (key, out.get(key))
    # Without a separate full_ema run, the fp32 step is the full-EMA step (same settings).
    assert out["full_ema_img_s"] == out["fit_fp32_img_s"]
    assert out["moco_overhead_pct"] == pytest.approx(
        100 * (1 - out["fit_fp32_img_s"] / out["backbone_only_img_s"]), abs=0.01)
    modes = out["modes"]
    assert modes["fit_bf16"][0]["precision"] == "mixed_bfloat16"
    assert modes["projector_momentum"][0]["scope"] == "projector"
    assert all(math.isfinite(runs[0]["loss"]) for runs in modes.values())
    # Each mode builds in its own policy; the global policy is float32 again afterwards.
    assert keras.mixed_precision.global_policy().name == "float32"
    names = [t["target"] for t in out["targets"]]
    assert any("overhead" in n for n in names) and any("projector" in n for n in names)
    json.dumps(out, allow_nan=False)


def test_bare_step_trains_query_encoder_only():
    from moco_tf import train_lib

    args = step.parse_args(TINY)

    model = train_lib.build_model(step.moco_config(args))
    query, key = model.backbone.trainable_weights[0], model.key_backbone.weights[0]
    q0, k0, queue0 = query.numpy(), key.numpy(), model.queue.numpy()
    bare = step.bare_step(model)
    views = next(iter(step.random_views(8, 8)))
    loss = float(bare(views))
    assert math.isfinite(loss) and -1.0 <= loss <= 1.0  # minus a mean cosine similarity
    assert not np.allclose(query.numpy(), q0)  # SGD moved the query encoder
    np.testing.assert_array_equal(key.numpy(), k0)  # no EMA, no gradient on the key encoder
    np.testing.assert_array_equal(model.queue.numpy(), queue0)  # no enqueue


def test_profile_sums_the_traced_ops_by_family(tmp_path):
    assert profile_step.family("_MklNativeConv2DBackpropFilter") == "conv_backward_filter"
    assert profile_step.family("_MklNativePadWithConv2D") == "conv_forward"
    assert profile_step.family("_MklNativeFusedBatchNormGradV3") == "batch_norm"
    assert profile_step.family("Conv2DBackpropInput") == "conv_backward_input"
    assert profile_step.family("AddV2") == "other"
    out = profile_step.run(["--size", "8", "--batch", "8", "--queue", "64", "--width", "8",
                            "--warmup", "1", "--steps", "1", "--logdir", str(tmp_path)])
    assert sum(out["share_pct"].values()) == pytest.approx(100, abs=0.5)
    convs = sum(v for k, v in out["share_pct"].items() if k.startswith("conv"))
    assert out["conv_share_pct"] == pytest.approx(convs, abs=0.5) and convs > 0
    assert out["share_pct"]["conv_backward_filter"] > 0  # the backward pass was traced too
    assert _positive(out["op_s_per_step"]) and out["trace_dir"] == str(tmp_path)
    json.dumps(out, allow_nan=False)


def test_step_cli_child_processes_and_torch_ratios():
    modes = "fit_fp32,torch_eager" if _has_torch() else "fit_fp32"
    proc = subprocess.run(
        [sys.executable, "benchmarks/step.py", *TINY, "--modes", modes, "--torch-threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["failed_modes"] == [] and out["settings"]["per_mode_process"]
    run = out["modes"]["fit_fp32"][0]
    assert _positive(run["img_s"]) and run["peak_rss_mb"] >= run["baseline_rss_mb"] > 0
    assert out["peak_memory_mb"] == run["peak_rss_mb"]
    if _has_torch():
        assert _positive(out["torch_eager_img_s"])
        eager = {t["target"]: t for t in out["targets"]}["fp32 fit / torch eager"]
        assert eager["value"] == pytest.approx(
            out["fit_fp32_img_s"] / out["torch_eager_img_s"], rel=1e-3)
        assert eager["pass"] == (eager["value"] >= 2.0)
        assert out["torch_peak_memory_mb"] == out["torch_eager_peak_rss_mb"]


def test_targets_from_given_numbers():
    per_mode = {
        "fit_fp32": [{"img_s": 95.0, "peak_rss_mb": 900.0}],
        "backbone_only": [{"img_s": 100.0, "peak_rss_mb": 880.0}],
        "full_ema": [{"img_s": 90.0, "peak_rss_mb": 1.0}, {"img_s": 110.0, "peak_rss_mb": 2.0},
                     {"img_s": 100.0, "peak_rss_mb": 3.0}],
        "projector_momentum": [{"img_s": 120.0, "peak_rss_mb": 1.0}],
        "torch_eager": [{"img_s": 40.0, "peak_rss_mb": 1000.0}],
        "torch_compile": [{"img_s": 80.0, "peak_rss_mb": 1200.0}, {"mode": "x", "error": "boom"}],
    }
    out = step.collect(per_mode)
    assert out["full_ema_img_s"] == 100.0  # median over repeats
    assert out["moco_overhead_pct"] == 5.0
    assert out["torch_peak_memory_mb"] == 1000.0  # the leaner torch run
    checks = {c["target"]: c for c in step.ratio_checks(out)}
    assert checks["fp32 fit / torch.compile"]["value"] == pytest.approx(95 / 80, abs=1e-3)
    assert checks["fp32 fit / torch.compile"]["pass"] is False  # 1.19 < 1.2
    assert checks["fp32 fit / torch eager"]["pass"] is True  # 2.375
    assert checks["MoCo overhead % (1 - fit_fp32 / backbone_only)"]["pass"] is True  # 5 <= 5
    assert checks["projector-only / full EMA"]["pass"] is False  # 1.2
    assert checks["peak memory ours / torch"]["pass"] is True  # 0.9
    assert not any("bf16" in name for name in checks)  # not measured: no verdict


def test_pipeline_ours_vs_torchvision():
    argv = ["--datasets", "rgb32", "--seconds", "0.3", "--batch", "16", "--examples", "256"]
    out = pipeline.run(argv + ([] if _has_torch() else ["--no-torch"]))
    assert _positive(out["ours_rgb32_img_s"])
    assert out["settings"]["rgb32"]["channels"] == 3
    assert "quickstart_input_bound" not in out  # only measured with the quickstart's data
    if _has_torch():
        assert _positive(out["torch_rgb32_img_s"])
        assert out["ours_vs_torch_rgb32"] == pytest.approx(
            out["ours_rgb32_img_s"] / out["torch_rgb32_img_s"], abs=0.01)
        target = out["targets"][0]
        assert target["pass"] == (target["value"] >= 2.0)


def test_pipeline_jpeg_folder_reports_every_rate_and_target():
    out = pipeline.run(["--source", "jpeg_folder", "--images", "6", "--batch", "4",
                        "--seconds", "0.2", "--repeats", "1", "--workers", "1"]
                       + ([] if _has_torch() else ["--no-torch"]))
    for key in ("jpeg224_ours_img_s", "jpeg224_host_part_device_aug_img_s",
                "jpeg224_decode_only_img_s"):
        assert _positive(out[key]), key
    assert _positive(out["photometric224_ms_per_image"]["fast"])
    assert out["photometric224_speedup"] == pytest.approx(
        out["photometric224_ms_per_image"]["plain"] / out["photometric224_ms_per_image"]["fast"],
        abs=0.01)
    assert out["targets"][0]["pass"] == (out["photometric224_speedup"] >= 2.0)
    if _has_torch():
        assert out["jpeg224_ours_vs_torchvision"] == pytest.approx(
            out["jpeg224_ours_img_s"] / out["jpeg224_torchvision_img_s"], abs=0.01)


def test_pipeline_quickstart_input_bound_check():
    out = pipeline.run(["--datasets", "fashion_mnist", "--seconds", "0.3", "--batch", "16",
                        "--synthetic", "--examples", "256", "--no-torch", "--step-config",
                        "fashion_mnist:smoke", "--step-steps", "2", "--step-warmup", "1"])
    assert _positive(out["ours_fashion_mnist_img_s"])
    assert out["settings"]["fashion_mnist"]["crop_scale"] == [0.3, 1.0]  # the quickstart's
    assert _positive(out["quickstart_step_img_s"])
    assert _positive(out["quickstart_fit_on_pipeline_img_s"])
    assert out["quickstart_input_bound"] == (out["quickstart_pipeline_slowdown_pct"] > 5.0)
    assert keras.mixed_precision.global_policy().name == "float32"
    json.dumps(out, allow_nan=False)


def test_pipeline_input_bound_from_given_step_rate():
    out = pipeline.run(["--datasets", "fashion_mnist", "--seconds", "0.2", "--batch", "16",
                        "--synthetic", "--examples", "64", "--no-torch", "--step-img-s", "1e9"])
    # No pipeline delivers 1e9 images per second: the verdict must be "input-bound".
    assert out["quickstart_input_bound"] is True
    assert out["targets"][-1] == {"target": "quickstart not input-bound", "op": "not input-bound",
                                  "value": out["quickstart_pipeline_headroom"], "bound": None,
                                  "pass": False}

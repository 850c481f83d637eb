"""MoCo v2 training-step throughput and peak memory on CPU: our `model.fit` vs the bare backbone
work vs the PyTorch reference, side by side in one run.

The step has the shape of the reference (`benchmarks/torch_moco_ref.py`, the official MoCo v2
step in PyTorch): ResNet-18 with the CIFAR stem (width 64), 32 px RGB, batch 256, K = 4096, MLP
projector 512-512-128, m = 0.99, T = 0.2, SGD(0.03, momentum 0.9, weight decay 1e-4), plain BN with
the key batch shuffled. Modes (each in its own child process, so its peak RSS is its own and the
global Keras dtype policy starts fresh):

  fit_fp32, fit_bf16      `model.fit` of `train_lib.build_model(config)` (float32 / mixed_bfloat16)
  backbone_only[_bf16]    the bare encoder work in a minimal tf.function with the same layers:
                          query encoder forward + backward + SGD, key encoder forward; no queue,
                          no EMA, no logits, no shuffle. MoCo overhead = 1 - fit / backbone_only.
  full_ema, projector_momentum            momentum scope "full" vs "projector", symmetric=False
  full_ema_symmetric, projector_momentum_symmetric   the same with the symmetric loss (as
                          configs/projector_momentum.py trains): projector scope saves the key
                          backbone's forward passes only when both views' backbone features are
                          computed anyway, i.e. with the symmetric loss.
  torch_eager, torch_compile   (--compare-torch) the reference step (torch_moco_ref.MoCo).

How close both steps come to what their convolution kernels allow was a one-off investigation:
`experiments/conv_bound.py`, numbers in docs/performance.md.

Timing: `fit` on a cached in-memory dataset of random images (a few distinct batches, repeated);
the first `--warmup` executions (tracing, allocation) are dropped and the median of the next
`--steps` is reported, as the reference does. `--steps-per-execution N` runs N steps per
tf.function call (off by default: the per-call overhead is small next to a ResNet-18 step
at batch 256).

    python benchmarks/step.py --compare-torch > step.json      # every mode, torch included
    python benchmarks/step.py --modes fit_fp32,fit_bf16         # a subset
    python benchmarks/step.py --size 8 --batch 8 --steps 2 --queue 64 --width 8   # smoke run

Prints one JSON object on stdout (img/s per mode, peak memory, MoCo overhead, and with
--compare-torch the ratios against the performance targets, `TARGETS`, with pass/fail); a
summary on stderr.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# TensorFlow and torch are imported inside the functions that need them: a torch child process
# must not load TensorFlow (and vice versa), or its peak RSS would count the other framework.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# CIFAR-10 channel statistics; the model normalises inside (the reference feeds raw tensors).
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# mode -> how to run it. "fit": model.fit of build_model(config); "bare": backbone work only.
MODES = {
    "fit_fp32": dict(kind="fit", precision="float32"),
    "fit_bf16": dict(kind="fit", precision="mixed_bfloat16"),
    "backbone_only": dict(kind="bare", precision="float32"),
    "backbone_only_bf16": dict(kind="bare", precision="mixed_bfloat16"),
    "full_ema": dict(kind="fit", precision="float32", scope="full"),
    "projector_momentum": dict(kind="fit", precision="float32", scope="projector"),
    "full_ema_symmetric": dict(kind="fit", precision="float32", scope="full", symmetric=True),
    "projector_momentum_symmetric": dict(
        kind="fit", precision="float32", scope="projector", symmetric=True),
    "torch_eager": dict(kind="torch", compile=False),
    "torch_compile": dict(kind="torch", compile=True),
}
# Default run order: the torch reference right after our fp32 step (same machine state), the two
# momentum scopes next to each other.
TF_MODES = ["fit_fp32", "fit_bf16", "backbone_only", "backbone_only_bf16", "full_ema",
            "projector_momentum", "full_ema_symmetric", "projector_momentum_symmetric"]
TORCH_MODES = ["torch_eager", "torch_compile"]

# The project's performance targets (docs/performance.md): (name, numerator key, denominator
# key, comparison, bound).
TARGETS = [
    ("fp32 fit / torch.compile", "fit_fp32_img_s", "torch_compile_img_s", ">=", 1.2),
    ("fp32 fit / torch eager", "fit_fp32_img_s", "torch_eager_img_s", ">=", 2.0),
    ("bf16 fit / torch.compile fp32", "fit_bf16_img_s", "torch_compile_img_s", ">=", 1.5),
    ("MoCo overhead % (1 - fit_fp32 / backbone_only)", "moco_overhead_pct", None, "<=", 5.0),
    ("projector-only / full EMA", "projector_momentum_img_s", "full_ema_img_s", ">=", 1.25),
    ("projector-only / full EMA (symmetric loss)", "projector_momentum_symmetric_img_s",
     "full_ema_symmetric_img_s", ">=", 1.25),
    ("peak memory ours / torch", "peak_memory_mb", "torch_peak_memory_mb", "<=", 1.0),
]


# --- measurements (run inside one child process per mode) ---------------------------------------


def _peak_rss_mb():
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _summary(mode, seconds_per_step, batch, baseline_mb, **extra):
    med = statistics.median(seconds_per_step)
    return {
        "mode": mode,
        "img_s": round(batch / med, 2),
        "median_step_s": round(med, 4),
        "mean_step_s": round(statistics.fmean(seconds_per_step), 4),
        "timed_steps": len(seconds_per_step),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        # RSS peak before the model was built (imports, data): peak - baseline ~ the step's own.
        "baseline_rss_mb": round(baseline_mb, 1),
        **extra,
    }


def moco_config(args, precision="float32", scope="full", symmetric=False):
    """The reference's MoCo v2 step as a moco_tf config (validated)."""
    from moco_tf import config as config_lib

    c = config_lib.defaults()
    c.precision = precision
    c.data.source = "synthetic"  # unused: the benchmark feeds its own in-memory batches
    c.data.image_size, c.data.channels = args.size, 3
    c.data.mean, c.data.std = CIFAR_MEAN, CIFAR_STD
    c.model.backbone, c.model.width, c.model.cifar_stem = args.backbone, args.width, True
    # The reference: plain BN on one device, the key batch shuffled before the key encoder
    # (our "full" scope always shuffles the key batch).
    c.model.norm = "bn"
    c.model.projector = "mlp"  # hidden = feature dim (512), as the reference's fc head
    c.moco.dim, c.moco.queue_size = 128, args.queue
    c.moco.momentum, c.moco.temperature = 0.99, 0.2
    c.moco.momentum_scope, c.moco.symmetric = scope, symmetric
    c.train.batch_size = args.batch
    c.train.base_learning_rate, c.train.lr_schedule = 0.03 * 256 / args.batch, "constant"
    c.train.optimizer_momentum, c.train.weight_decay = 0.9, 1e-4
    c.train.steps_per_execution = args.steps_per_execution
    c.train.jit_compile = args.jit
    return config_lib.validate(c)


def random_views(batch, size, channels=3, distinct_batches=4, seed=0):
    """A cached, repeating dataset of `distinct_batches` batches of two random views in [0, 1]."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    shape = (distinct_batches, batch, size, size, channels)
    views = {"view1": rng.random(shape, np.float32), "view2": rng.random(shape, np.float32)}
    # Already batched in memory: the input costs one tensor copy per step.
    return tf.data.Dataset.from_tensor_slices(views).cache().repeat().prefetch(2)


def make_step_timer():
    """A Keras callback recording the wall time between consecutive executions of the step."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.stamps, self.losses = [time.perf_counter()], []

        def on_train_batch_end(self, batch, logs=None):
            # Reading a value waits for the step; a batch-end hook also keeps Keras from
            # dispatching callbacks asynchronously.
            self.losses.append(float(logs["batch_loss"]))
            self.stamps.append(time.perf_counter())

        def intervals(self):
            return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    return StepTimer()


def time_fit(model, dataset, warmup, steps, steps_per_execution=1):
    """Seconds per step of `model.fit` over `steps` executions after `warmup`; and the last loss."""
    timer = make_step_timer()
    model.fit(dataset, epochs=1, steps_per_epoch=(warmup + steps) * steps_per_execution,
              callbacks=[timer], verbose=0, shuffle=False)
    per_step = [t / steps_per_execution for t in timer.intervals()[warmup:]]
    return per_step, timer.losses[-1]


def bare_step(model):
    """tf.function(views) -> loss: the encoder work of `model`'s step without the MoCo parts.

    Same layers and optimizer as the MoCo model: query backbone + projector forward and backward,
    weight decay and SGD on the query encoder, key backbone + projector forward. The loss uses
    the key (a positive logit only) so graph pruning cannot drop the key encoder's forward.
    """
    import tensorflow as tf

    variables = model.trainable_variables
    model.optimizer.build(variables)  # Keras optimizers create their slots outside tf.function

    @tf.function
    def step(views):
        with tf.GradientTape() as tape:
            q = model.projector(model.backbone(views["view1"], training=True), training=True)
            k = model.key_projector(
                model.key_backbone(views["view2"], training=True), training=True)
            q = tf.math.l2_normalize(tf.cast(q, tf.float32), 1)
            k = tf.math.l2_normalize(tf.cast(k, tf.float32), 1)
            loss = -tf.reduce_mean(tf.reduce_sum(q * tf.stop_gradient(k), 1))
        grads = tape.gradient(loss, variables)  # weight decay: in the optimizer, as in the step
        model.optimizer.apply_gradients(zip(grads, variables))
        return loss

    return step


def measure_tf(mode, args):
    """One TF mode: build the model in a fresh dtype policy, time it, report img/s and memory."""
    import keras
    import tensorflow as tf

    from moco_tf import train_lib

    spec = MODES[mode]
    keras.backend.clear_session()  # in-process runs: drop the previous mode's model
    dataset = random_views(args.batch, args.size)
    keras.utils.set_random_seed(0)
    baseline = _peak_rss_mb()
    config = moco_config(args, spec["precision"], spec.get("scope", "full"),
                         spec.get("symmetric", False))
    try:
        model = train_lib.build_model(config)  # sets the global dtype policy
        if spec["kind"] == "fit":
            per_step, loss = time_fit(model, dataset, args.warmup, args.steps,
                                      args.steps_per_execution)
        else:
            step, it, per_step = bare_step(model), iter(dataset), []
            for i in range(args.warmup + args.steps):
                start = time.perf_counter()
                loss = float(step(next(it)))
                if i >= args.warmup:
                    per_step.append(time.perf_counter() - start)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    extra = {"precision": spec["precision"], "loss": loss}
    if "scope" in spec:
        extra.update(scope=spec["scope"], symmetric=spec.get("symmetric", False))
    try:  # TensorFlow's allocator peak (tensors only); left out when the allocator reports 0
        tensor_peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20
        if tensor_peak:
            extra["tf_tensor_peak_mb"] = round(tensor_peak, 1)
    except (ValueError, RuntimeError):
        pass
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    extra["intra_op_threads"] = threads or os.cpu_count()  # 0 = TF's default: one per core
    return _summary(mode, per_step, args.batch, baseline, **extra)


def _torch_reference():
    """benchmarks/torch_moco_ref.py as a module (benchmarks/ is not a package); imports torch."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_moco_ref.py")
    spec = importlib.util.spec_from_file_location("torch_moco_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_backbone(arch, dim):
    """The reference's encoder (experiments/conv_bound.py times its convolutions)."""
    return _torch_reference().backbone(arch, dim)


def measure_torch(mode, args):
    """The reference step, eager or with torch.compile, timed like the TF modes."""
    import torch

    compiled = MODES[mode]["compile"]
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    xq = torch.rand(args.batch, 3, args.size, args.size)
    xk = torch.rand(args.batch, 3, args.size, args.size)
    baseline = _peak_rss_mb()
    model = _torch_reference().MoCo("resnet18_cifar", K=args.queue)
    opt = torch.optim.SGD(list(model.q.parameters()), lr=0.03, momentum=0.9, weight_decay=1e-4)
    if compiled:  # the encoders only: the in-place queue update breaks whole-model compile
        model.q = torch.compile(model.q)
        model.k = torch.compile(model.k)
    per_step = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(xq, xk)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= args.warmup:
            per_step.append(time.perf_counter() - start)
    return _summary(mode, per_step, args.batch, baseline, loss=float(loss.detach()),
                    threads=torch.get_num_threads(), torch_version=torch.__version__,
                    note="ResNet-18 width 64 (the reference's; --width applies to ours only)")


def measure(mode, args):
    """Runs one mode in this process; returns its result dict."""
    return (measure_torch if MODES[mode]["kind"] == "torch" else measure_tf)(mode, args)


# --- orchestration ------------------------------------------------------------------------------


def _child_argv(args):
    argv = ["--size", args.size, "--batch", args.batch, "--queue", args.queue, "--width",
            args.width, "--backbone", args.backbone, "--steps", args.steps, "--warmup",
            args.warmup, "--steps-per-execution", args.steps_per_execution,
            "--torch-threads", args.torch_threads]
    return [str(a) for a in argv] + (["--jit"] if args.jit else [])


def run_child(mode, args):
    """`measure(mode)` in a fresh Python process: its own peak RSS, its own dtype policy."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", mode] + _child_argv(args),
        capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        # One failing mode (e.g. torch.compile without a C++ compiler) must not lose the others.
        return {"mode": mode, "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
    return json.loads(lines[-1])


def ratio_checks(results):
    """[(name, value, comparison, bound, passed)] for every target whose inputs were measured."""
    checks = []
    for name, num, den, op, bound in TARGETS:
        a = results.get(num)
        b = results.get(den) if den else 1.0
        if a is None or not b:
            continue
        value = a / b
        passed = value >= bound if op == ">=" else value <= bound
        checks.append({"target": name, "value": round(value, 3), "op": op, "bound": bound,
                       "pass": bool(passed)})
    return checks


def collect(per_mode):
    """The flat JSON keys from the per-mode results (median over repeats)."""
    out = {}
    for mode, runs in per_mode.items():
        runs = [r for r in runs if "error" not in r]
        if not runs:
            continue
        out[f"{mode}_img_s"] = round(statistics.median(r["img_s"] for r in runs), 2)
        out[f"{mode}_peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    if "fit_fp32_peak_rss_mb" in out:
        out["peak_memory_mb"] = out["fit_fp32_peak_rss_mb"]
    torch_mem = [out[f"{m}_peak_rss_mb"] for m in TORCH_MODES if f"{m}_peak_rss_mb" in out]
    if torch_mem:
        # The stricter comparison: our step against the leaner of the two torch runs.
        out["torch_peak_memory_mb"] = min(torch_mem)
    if "fit_fp32_img_s" in out and "backbone_only_img_s" in out:
        out["moco_overhead_pct"] = round(
            100 * (1 - out["fit_fp32_img_s"] / out["backbone_only_img_s"]), 2)
    if "fit_bf16_img_s" in out and "backbone_only_bf16_img_s" in out:
        out["moco_overhead_bf16_pct"] = round(
            100 * (1 - out["fit_bf16_img_s"] / out["backbone_only_bf16_img_s"]), 2)
    return out


def run(argv=None):
    """Parses `argv`, runs the modes, returns the JSON-ready result dict."""
    args = parse_args(argv)
    if args.child:
        return measure(args.child, args)
    modes = args.modes.split(",") if args.modes else list(TF_MODES)
    if not args.modes and args.compare_torch:  # the reference right after our fp32 step
        modes[1:1] = TORCH_MODES
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {list(MODES)}")
    per_mode = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            result = measure(mode, args) if args.in_process else run_child(mode, args)
            per_mode[mode].append(result)
            if "error" in result:
                print(f"[step.py] {mode} FAILED: {result['error']}", file=sys.stderr, flush=True)
            else:
                print(f"[step.py] {mode}: {result['img_s']} img/s, peak RSS "
                      f"{result['peak_rss_mb']} MB", file=sys.stderr, flush=True)
    out = collect(per_mode)
    # The scopes' required keys: with symmetric=False, full_ema is the fp32 fit step.
    if "full_ema_img_s" not in out and "fit_fp32_img_s" in out:
        out["full_ema_img_s"] = out["fit_fp32_img_s"]
    out["targets"] = ratio_checks(out)
    out["failed_modes"] = [m for m, runs in per_mode.items() if any("error" in r for r in runs)]
    out["settings"] = {
        "backbone": args.backbone, "width": args.width, "size": args.size, "channels": 3,
        "batch": args.batch, "queue": args.queue, "norm": "bn + key-batch shuffle",
        "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
        "steps_per_execution": args.steps_per_execution, "jit_compile": args.jit,
        "per_mode_process": not args.in_process, "run_order": modes, "cpus": os.cpu_count(),
    }
    out["modes"] = per_mode
    return out


def add_step_args(p):
    """The step's shape and execution flags (moco_config reads them); profile_step.py shares them."""
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--queue", type=int, default=4096, help="K")
    p.add_argument("--width", type=int, default=64, help="ResNet width (64 = the reference)")
    p.add_argument("--backbone", default="resnet18", help="resnet18 (the reference) | small_cnn")
    p.add_argument("--steps-per-execution", type=int, default=1)
    p.add_argument("--jit", action="store_true", help="XLA (slower on this CPU, DESIGN §5)")
    return p


def parse_args(argv=None):
    p = add_step_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps per mode")
    p.add_argument("--repeats", type=int, default=1, help="run the whole sequence N times")
    p.add_argument("--modes", default="", help=f"comma list, in run order, of {list(MODES)}")
    p.add_argument("--compare-torch", action="store_true",
                   help="also run the PyTorch reference (eager, torch.compile) and check targets")
    p.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    p.add_argument("--in-process", action="store_true",
                   help="all modes in this process (faster; peak memory is then cumulative)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _print_summary(out):
    for c in out.get("targets", []):
        verdict = "PASS" if c["pass"] else "FAIL"
        print(f"  {verdict}  {c['target']}: {c['value']} (target {c['op']} {c['bound']})",
              file=sys.stderr)


def main(argv=None):
    out = run(argv)
    if "targets" in out:
        _print_summary(out)
    print(json.dumps(out, allow_nan=False))
    return out


if __name__ == "__main__":
    main()

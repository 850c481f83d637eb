"""Where the time of our `model.fit` MoCo step goes: TF profiler trace, op time by op type.

Same step and settings as `benchmarks/step.py` (the PyTorch reference's MoCo v2 step: ResNet-18
CIFAR stem, 32 px, batch 256, K = 4096). After `--warmup` steps, `--steps` steps run under
`tf.profiler`; the trace (open it with TensorBoard's profile plugin) stays in `--logdir`, and the
op executions in it are summed by op type. Ops run on two inter-op threads at once, so the op
times add up to more than the wall time; the shares are of the summed op time.

    python benchmarks/profile_step.py > profile.json                  # the float32 step
    python benchmarks/profile_step.py --precision mixed_bfloat16

Prints one JSON object: wall seconds per step, the share of convolutions (forward, backward to
the input, backward to the filter), of batch norm, of the rest, and the top op types.
"""
import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step as step_bench  # noqa: E402  (the same config, data and timing callback)

# Op-type families; oneDNN kernels are named e.g. "_MklNativeConv2DBackpropFilter".
FAMILIES = {
    "conv_forward": ("Conv2D", "PadWithConv2D", "FusedConv2D"),
    "conv_backward_input": ("Conv2DBackpropInput",),
    "conv_backward_filter": ("Conv2DBackpropFilter",),
    "batch_norm": ("FusedBatchNormV3", "FusedBatchNormEx", "FusedBatchNormGradV3",
                   "FusedBatchNormGradEx"),
}


def family(op_type):
    """The family of an op type, ignoring oneDNN's `_Mkl`/`_MklNative` prefixes."""
    base = op_type.replace("_MklNative", "").replace("_Mkl", "")
    for name, members in FAMILIES.items():
        if base in members:
            return name
    return "other"


def op_seconds(logdir):
    """{op type: seconds} summed over the trace's TF executor threads."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"no profiler trace under {logdir}")
    space = xplane_pb2.XSpace()
    with open(max(paths, key=os.path.getmtime), "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # the executor's op threads
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if "::" in name or ":" not in name:  # executor bookkeeping, not an op
                    continue
                totals[name.rsplit(":", 1)[1]] += event.duration_ps * 1e-12
    return totals


def run(argv=None):
    args = parse_args(argv)
    import keras
    import tensorflow as tf

    from moco_tf import train_lib

    try:
        model = train_lib.build_model(step_bench.moco_config(args, args.precision))
        dataset = step_bench.random_views(args.batch, args.size)
        spe = args.steps_per_execution
        step_bench.time_fit(model, dataset, 0, args.warmup, spe)  # tracing, allocation
        logdir = args.logdir or tempfile.mkdtemp(prefix="moco_profile_")
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        step_bench.time_fit(model, dataset, 0, args.steps, spe)
        steps = args.steps * spe  # time_fit runs `steps` executions of `spe` steps each
        wall = (time.perf_counter() - start) / steps
        tf.profiler.experimental.stop()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    totals = op_seconds(logdir)
    op_total = sum(totals.values())
    shares = collections.Counter()
    for op_type, seconds in totals.items():
        shares[family(op_type)] += seconds
    return {
        "precision": args.precision,
        "wall_s_per_step": round(wall, 4),  # includes the profiler's own overhead
        "op_s_per_step": round(op_total / steps, 4),
        "share_pct": {name: round(100 * s / op_total, 1) for name, s in shares.most_common()},
        "conv_share_pct": round(100 * sum(s for n, s in shares.items() if n.startswith("conv"))
                                / op_total, 1),
        "top_ops": [{"op": op, "share_pct": round(100 * s / op_total, 1)}
                    for op, s in totals.most_common(args.top)],
        "trace_dir": logdir,
        "settings": {"backbone": args.backbone, "width": args.width, "size": args.size,
                     "batch": args.batch, "queue": args.queue, "steps": steps,
                     "steps_per_execution": spe},
    }


def parse_args(argv=None):
    p = step_bench.add_step_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--precision", default="float32", help="float32 | mixed_bfloat16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--top", type=int, default=12, help="op types listed")
    p.add_argument("--logdir", default="", help="trace directory (default: a new temp dir)")
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(run()))

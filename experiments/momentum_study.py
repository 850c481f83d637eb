"""The momentum-encoder study (Pham et al. 2022, arXiv 2208.05744) on Fashion-MNIST, several seeds.

Every method trains the quickstart's data, backbone, optimizer, batch and budget
(`configs/fashion_mnist.py`); only the method switches differ:

  MoCo v2                 full EMA, queue, one view as query
  MoCo v2 symmetric       full EMA, queue, both views as queries
  SimCLR                  no EMA, NT-Xent over both views (2N - 2 in-batch negatives)
  SimCLR + EMA            full EMA key encoder, NT-Xent
  EMA from layer3         backbone shared up to layer3, EMA of layer3, layer4 and the projector
  EMA from layer4         backbone shared up to layer4, EMA of layer4 and the projector
  Projector-only EMA      EMA of the projector only (the paper's proposal)

Each (method, seed) is one `train_and_evaluate` run in `--out/runs/<method>/seed<k>`, with kNN
(k = 200, 20) after every epoch and a linear evaluation of its export. A run that was stopped
resumes from its checkpoints; finished runs are skipped: rerunning the command finishes a
half-done study. Report: `--out/results.json`, `results.md`, `knn.png`, `fluctuation.png`.

Per-block gradient fluctuation: every `--probe_every` steps the gradient of the method's own
loss with respect to each block's output (view 1's forward) is computed on one fixed probe
batch, with a fixed shuffle-BN permutation. Three measures per block, over training:
  cv          coefficient of variation of the gradient norm ||dL/dh_b|| across probes — how
              much the gradient magnitude varies (our reading of the paper's "the final layers
              tend to fluctuate much more"; its exact formula is not in the abstract);
  detrended   the same around a moving average of 5 probes: the variation without the slow
              drift of the norm over training;
  rel_change  mean ||g_t - g_(t-1)|| / ||g_(t-1)|| between consecutive probes (the measure the
              first version of this study used).

  python experiments/momentum_study.py --out=runs/momentum_study            # ~6 h on 2 cores
  python experiments/momentum_study.py --out=runs/momentum_study --time     # step times, idle machine
  python experiments/momentum_study.py --out=runs/momentum_study --report   # tables and plots only
  python experiments/momentum_study.py --small --out=/tmp/study             # a check in a minute
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import common  # noqa: E402

METHODS = {  # name -> (momentum_scope, negatives, symmetric)
    "MoCo v2": ("full", "queue", False),
    "MoCo v2 symmetric": ("full", "queue", True),
    "SimCLR": ("none", "both_views", True),
    "SimCLR + EMA": ("full", "both_views", True),
    "EMA from layer3": ("from:layer3", "both_views", True),
    "EMA from layer4": ("from:layer4", "both_views", True),
    "Projector-only EMA": ("projector", "both_views", True),
}

_OUT = flags.DEFINE_string("out", "runs/momentum_study", "Output folder.")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs per run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per method.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Methods to run.")
_PROBE_EVERY = flags.DEFINE_integer("probe_every", 25, "Steps between gradient probes.")
_LINEAR_EPOCHS = flags.DEFINE_integer("linear_epochs", 30, "Epochs of the linear evaluation.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time (each in its own process).")
_REPORT = flags.DEFINE_bool("report", False, "Only write the report from finished runs.")
_SMALL = flags.DEFINE_bool("small", False, "Tiny synthetic runs (to check the script).")
_TIME = flags.DEFINE_bool("time", False, "Time every method's step (idle machine), then report.")
_TIME_STEPS = flags.DEFINE_integer("time_steps", 40, "Timed steps per method.")
_RUN = flags.DEFINE_string("run", "", "Internal: 'method|seed' to run in this process.")
_TIME_RUN = flags.DEFINE_string("time_run", "", "Internal: the method to time in this process.")


def slug(name):
    return name.lower().replace(" + ", "_plus_").replace(" ", "_").replace("-", "_")


def run_dir(name, seed):
    return os.path.join(_OUT.value, "runs", slug(name), f"seed{seed}")


def make_config(name, seed):
    from configs import fashion_mnist

    config = fashion_mnist.get_config()
    scope, negatives, symmetric = METHODS[name]
    config.moco.momentum_scope, config.moco.negatives = scope, negatives
    config.moco.symmetric = symmetric
    config.seed = int(seed)
    # As when the study ran (the quickstart of 0.2.0).
    config.data.crop_scale, config.train.base_learning_rate = (0.3, 1.0), 0.03
    config.train.epochs = _EPOCHS.value
    config.train.verbose = 2
    config.eval.knn_every_epochs = 1
    config.eval.raw_pixel_baseline = False
    return common.shrink(config) if _SMALL.value else config


# --- one run (in its own process) -------------------------------------------------------------


class GradientProbe:
    """A Keras callback (built lazily: TF is imported in the run's process only) that records
    ||dL/dh_b|| and dL/dh_b of every block b on a fixed probe batch every `every` steps, into
    `path` (JSON lines: a resumed run appends)."""

    def __new__(cls, *args, **kwargs):
        import keras
        import tensorflow as tf

        class Probe(keras.callbacks.Callback):
            def __init__(self, probe, every, path):
                super().__init__()
                self.probe, self.every, self.path = probe, every, path
                self.previous = None

            def on_train_begin(self, logs=None):
                backbone = self.model.backbone
                self.names = block_names(backbone) + ["projector"]
                taps = [backbone.get_layer(n).output for n in self.names[:-1]]
                self.tapped = keras.Model(backbone.input, taps + [backbone.output])
                self.gradients = tf.function(self._gradients)

            def _gradients(self, x1, x2):
                model, encoder = self.model, self.model.key_encoder
                step = tf.constant(0, tf.int64)  # a fixed shuffle-BN permutation for every probe
                with tf.GradientTape() as tape:
                    *blocks, h1 = self.tapped(x1, training=True)
                    z = model.projector(h1, training=True)
                    tape.watch(z)
                    q1 = tf.math.l2_normalize(tf.cast(
                        model.predictor(z, training=True) if model.predictor else z,
                        tf.float32), 1)
                    h2, cut2 = encoder.online_features(model.backbone, x2)
                    cut1 = encoder.trunk(x1, training=True) if encoder.trunk else None
                    k2 = encoder.keys(x2, h2, cut2, step, view=0)
                    k1 = encoder.keys(x1, h1, cut1, step, view=1) if model.symmetric else None
                    loss, _ = model.negatives.contrast(q1, k2, same_view_keys=k1)
                    if model.symmetric:
                        loss = loss + model.negatives.contrast(model.query(h2), k1, k2)[0]
                    loss = tf.reduce_mean(loss)
                return tape.gradient(loss, blocks + [z])

            def on_train_batch_end(self, batch, logs=None):
                step = int(self.model.optimizer.iterations.numpy())
                if step % self.every:
                    return
                # The probe runs BN in training mode: put its moving statistics back after it.
                state = self.model.non_trainable_variables
                saved = [v.numpy() for v in state]
                grads = [np.asarray(g, np.float32).ravel()
                         for g in self.gradients(self.probe["view1"], self.probe["view2"])]
                for v, value in zip(state, saved):
                    v.assign(value)
                record = {"step": step, "norm": [float(np.linalg.norm(g)) for g in grads]}
                if self.previous is not None:
                    record["rel_change"] = [
                        float(np.linalg.norm(g - p) / (np.linalg.norm(p) + 1e-12))
                        for g, p in zip(grads, self.previous)]
                self.previous = grads
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")

        return Probe(*args, **kwargs)


def block_names(backbone):
    """The stem and every residual block's output, in order (torchvision names)."""
    names = [l.name for l in backbone.layers if l.name == "relu" or l.name.endswith(".out")]
    return names or [l.name for l in backbone.layers if l.name.startswith("relu")]


def run_one(name, seed):
    """Trains, evaluates (kNN, linear) and records one run; resumes if stopped."""
    from moco_tf import data, train_lib
    from moco_tf.eval import linear

    config, workdir = make_config(name, seed), run_dir(name, seed)
    os.makedirs(workdir, exist_ok=True)
    probe_views = next(iter(data.train_dataset(config.data, 64, seed=12345)))
    probe = GradientProbe(probe_views, _PROBE_EVERY.value, os.path.join(workdir, "probes.jsonl"))
    start = time.perf_counter()
    _, results = train_lib.train_and_evaluate(config, workdir, callbacks=[probe])
    lin = linear.evaluate(results["export_dir"], config, epochs=_LINEAR_EPOCHS.value)
    results.update(method=name, seed=int(seed), wall_seconds=round(time.perf_counter() - start, 1),
                   linear_top1=lin["top1"], blocks=probe.names)
    with open(os.path.join(workdir, "study.json"), "w") as f:
        json.dump(results, f, indent=2)


# --- the study ---------------------------------------------------------------------------------


def pending():
    return [(name, seed) for name in _METHODS.value for seed in _SEEDS.value
            if not os.path.exists(os.path.join(run_dir(name, seed), "study.json"))]


def run_all():
    """Runs the pending (method, seed) pairs, `--parallel` processes at a time."""
    passed = [f"--{f}={getattr(flags.FLAGS, f)}" for f in
              ("out", "epochs", "probe_every", "linear_epochs", "small")]
    common.run_processes([(f"{slug(name)}_seed{seed}", [os.path.abspath(__file__),
                                                      f"--run={name}|{seed}", *passed])
                        for name, seed in pending()], _PARALLEL.value, _OUT.value)


# --- step time on an idle machine (the equal-time comparison) ----------------------------------


def timing_path(name):
    return os.path.join(_OUT.value, "timing", f"{slug(name)}.json")


def time_one(name):
    """Seconds per training step of `name` (real input, both cores), median of `--time_steps`."""
    from benchmarks.step import time_fit
    from moco_tf import data, train_lib

    config = make_config(name, 0)
    model = train_lib.build_model(config)
    per_step, _ = time_fit(model, data.train_dataset(config.data, config.train.batch_size),
                           warmup=5, steps=_TIME_STEPS.value)
    os.makedirs(os.path.dirname(timing_path(name)), exist_ok=True)
    with open(timing_path(name), "w") as f:
        json.dump({"method": name, "seconds_per_step": float(np.median(per_step)),
                   "steps": len(per_step), "cpus": os.cpu_count()}, f, indent=2)


def time_all():
    """Times every method, one process after the other (run it on an otherwise idle machine)."""
    passed = [f"--{f}={getattr(flags.FLAGS, f)}" for f in ("out", "time_steps", "small")]
    common.run_processes([(f"time_{slug(name)}", [os.path.abspath(__file__), f"--time_run={name}",
                                                *passed])
                        for name in _METHODS.value if not os.path.exists(timing_path(name))],
                       1, _OUT.value)


def load_runs():
    runs = {}
    for name in METHODS:
        for seed in _SEEDS.value:
            path = os.path.join(run_dir(name, seed), "study.json")
            if os.path.exists(path):
                r = json.load(open(path))
                r["probes"] = [json.loads(line) for line in
                               open(os.path.join(run_dir(name, seed), "probes.jsonl"))]
                runs.setdefault(name, []).append(r)
    return runs


MEASURES = {  # summary key -> the plot's axis label
    "fluctuation_cv": "CV of ||dL/dh|| over training",
    "fluctuation_detrended_cv": "CV of ||dL/dh|| around its trend",
    "fluctuation_rel_change": "mean relative change of dL/dh",
}


def fluctuation(run, window=5):
    """Per block, the three MEASURES over the run's probes (lists, input -> output)."""
    norms = np.array([p["norm"] for p in run["probes"]])
    window = min(window, len(norms) - 1 + len(norms) % 2)  # odd, and no longer than the run
    changes = np.array([p["rel_change"] for p in run["probes"] if "rel_change" in p])
    cv = norms.std(0) / np.maximum(norms.mean(0), 1e-12)
    # The norm's slow drift over training (it grows several-fold at the projector) is not
    # fluctuation: measure the spread around a moving average of `window` probes instead.
    trend = np.stack([np.convolve(n, np.ones(window) / window, "valid") for n in norms.T], 1)
    residual = norms[window // 2:len(norms) - window // 2] - trend
    detrended = residual.std(0) / np.maximum(trend.mean(0), 1e-12)
    return cv.tolist(), detrended.tolist(), changes.mean(0).tolist()


def summarize(runs):
    """Mean and std over seeds of every number the report quotes."""
    def stat(values):
        values = np.asarray(values, np.float64)
        return {"mean": float(values.mean()), "std": float(values.std(ddof=1))
                if len(values) > 1 else 0.0, "n": int(len(values))}

    summary = {}
    for name, rs in runs.items():
        s = {key: stat([r[src] for r in rs]) for key, src in (
            ("knn_k200", "knn_top1"), ("knn_k20", "knn_top1_k20"), ("linear", "linear_top1"),
            ("train_seconds", "train_seconds"), ("images_per_sec", "images_per_sec"))}
        s["knn_curve"] = [stat([r["knn_per_epoch"][e]["k200"] for r in rs])
                          for e in range(len(rs[0]["knn_per_epoch"]))]
        s["blocks"] = rs[0]["blocks"]
        for key, per_run in zip(MEASURES, zip(*[fluctuation(r) for r in rs])):
            s[key] = [stat(v) for v in zip(*per_run)]  # per block: mean, std over seeds
            # Claim (3) in one number: > 1 when the output end fluctuates more than the input end.
            s[key + "_out_over_in"] = stat([f[-1] / max(f[0], 1e-12) for f in per_run])
        summary[name] = s
    # Equal wall time: every run's kNN curve read at the cheapest method's whole training time.
    # Training times are steps x the step time `--time` measured for all methods on one idle
    # machine; without it the runs' own times (distorted when runs shared a busy machine).
    for name, rs in runs.items():
        timed = os.path.exists(timing_path(name))
        seconds = (json.load(open(timing_path(name)))["seconds_per_step"] * rs[0]["steps"]
                   if timed else summary[name]["train_seconds"]["mean"])
        summary[name]["equal_time_basis"] = {"seconds": seconds, "timed_idle": timed}
    budget = min(s["equal_time_basis"]["seconds"] for s in summary.values())
    for name, rs in runs.items():
        total, at_budget = summary[name]["equal_time_basis"]["seconds"], []
        for r in rs:
            epochs = len(r["knn_per_epoch"])
            times = [total * (e + 1) / epochs for e in range(epochs)]
            accs = [e["k200"] for e in r["knn_per_epoch"]]
            at_budget.append(float(np.interp(budget, times, accs)))
        summary[name]["knn_k200_at_equal_time"] = stat(at_budget)
    return summary, budget


def write_report(runs):
    summary, budget = summarize(runs)
    out = _OUT.value
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"summary": summary, "equal_time_budget_seconds": budget,
                   "runs": {n: [{k: v for k, v in r.items() if k != "probes"} for r in rs]
                            for n, rs in runs.items()}}, f, indent=2)
    def pct(s):  # no spread to show from one seed
        return f"{100 * s['mean']:.2f}" + (f" ± {100 * s['std']:.2f}" if s["n"] > 1 else "")

    lines = [f"Fashion-MNIST, {_EPOCHS.value} epochs, seeds {', '.join(_SEEDS.value)} "
             "(mean ± std over seeds).", "",
             "| method | kNN k=200 | kNN k=20 | linear | kNN k=200 at equal time | "
             "training time | img/s (shared machine) |", "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} (n={s['knn_k200']['n']}) | {pct(s['knn_k200'])} | "
                     f"{pct(s['knn_k20'])} | {pct(s['linear'])} | "
                     f"{pct(s['knn_k200_at_equal_time'])} | "
                     f"{s['equal_time_basis']['seconds'] / 60:.1f} min | "
                     f"{s['images_per_sec']['mean']:.0f} |")
    timed = all(s["equal_time_basis"]["timed_idle"] for s in summary.values())
    lines += ["", f"Equal time: each curve read at {budget / 60:.1f} min of training (the fastest "
              "method's whole budget), linearly between epochs. Training time = steps x "
              + ("the step time measured by `--time` on an idle machine." if timed else
                 "(no `--time` measurements) the runs' own, possibly contended, wall time.")]
    lines += fluctuation_tables(summary)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(summary, out)


def fluctuation_tables(summary):
    """One Markdown table per MEASURES entry: methods x blocks (means over seeds), and the
    output-over-input ratio with its spread."""
    blocks = next(iter(summary.values()))["blocks"]
    short = [b.replace("layer", "l").replace(".out", "") for b in blocks]
    lines = []
    for key, label in MEASURES.items():
        lines += ["", f"{label} (per block, input -> output; mean over seeds):", "",
                  "| method | " + " | ".join(short) + f" | {short[-1]} / {short[0]} |",
                  "|---" * (len(blocks) + 2) + "|"]
        for name, s in summary.items():
            ratio = s[key + "_out_over_in"]
            lines.append(f"| {name} | " + " | ".join(f"{v['mean']:.3f}" for v in s[key])
                         + f" | {ratio['mean']:.2f}"
                         + (f" ± {ratio['std']:.2f} |" if ratio["n"] > 1 else " |"))
    return lines


def plot(summary, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in summary.items():
        mean = np.array([c["mean"] for c in s["knn_curve"]]) * 100
        std = np.array([c["std"] for c in s["knn_curve"]]) * 100
        epochs = np.arange(1, len(mean) + 1)
        ax.plot(epochs, mean, marker="o", label=name)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="epoch", ylabel="kNN top-1 (%), k=200", title="Fashion-MNIST: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "knn.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(15, 4.5))
    blocks = next(iter(summary.values()))["blocks"]
    for ax, (key, label) in zip(axes, MEASURES.items()):
        for name, s in summary.items():
            ax.errorbar(range(len(blocks)), [v["mean"] for v in s[key]],
                        yerr=[v["std"] for v in s[key]], marker="o", capsize=3, label=name)
        ax.set_xticks(range(len(blocks)), blocks, rotation=45, ha="right")
        ax.set(ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Per-block gradient fluctuation on the fixed probe batch (input → output), "
                 "mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fluctuation.png"), dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    if _RUN.value:
        name, seed = _RUN.value.split("|")
        return run_one(name, seed)
    if _TIME_RUN.value:
        return time_one(_TIME_RUN.value)
    if _TIME.value:
        time_all()
    elif not _REPORT.value:
        run_all()
    runs = load_runs()
    if runs:
        write_report(runs)


if __name__ == "__main__":
    app.run(main)

"""Sweeps the quickstart's recipe (`configs/fashion_mnist.py`) one change at a time.

Every variant is the quickstart config plus a few overrides (below: data, not code); each
(variant, seed) is one `train_and_evaluate` run in its own process, in `--out/runs/<variant>/seed<k>`,
optionally followed by a linear evaluation of its export. Finished runs are skipped and stopped
ones resume from their checkpoints, so rerunning the command finishes a half-done sweep. Data,
augmentation and initialisation are a pure function of the seed: a pilot at `--epochs=5` and the
same variant at the quickstart's epochs differ only by the schedule's length (and, for the
symmetric EMA methods, by CPU kernels' last bits: reruns agree to a few tenths of a point, see
docs/checkpoints.md; `"deterministic": True` in a variant's overrides makes them bit-identical).

  python experiments/quickstart_sweep.py --out=runs/sweep --epochs=5 --parallel=2   # pilots
  python experiments/quickstart_sweep.py --out=runs/sweep --variants="MoCo v2,SimCLR + projector EMA"
  python experiments/quickstart_sweep.py --out=runs/sweep --report    # sweep.json/.md, knn.png
  python experiments/quickstart_sweep.py --curve=runs/fashion_mnist    # one train.py run's knn.png

Wall times are only comparable between runs made on equally idle machines: the report quotes
them, and the accuracy columns are what the sweep compares.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from configs import fashion_mnist  # noqa: E402
from experiments import common  # noqa: E402

_SIMCLR = {"moco.negatives": "both_views", "moco.symmetric": True}  # the quickstart's
_MOCO_V2 = fashion_mnist.MOCO_V2
VARIANTS = {  # name (no commas: --variants splits on them) -> overrides of configs/fashion_mnist.py
    "quickstart": {},  # SimCLR + EMA from layer4 since version 0.3, lr 0.06 since 0.3.1
    "crop 0.5-1": {"data.crop_scale": (0.5, 1.0)},
    "crop 0.2-1": {"data.crop_scale": (0.2, 1.0)},
    "T 0.2": {"moco.temperature": 0.2},
    "T 0.07": {"moco.temperature": 0.07},
    "T 0.05": {"moco.temperature": 0.05},
    "batch 128": {"train.batch_size": 128},
    "lr 0.03": {"train.base_learning_rate": 0.03},  # the quickstart of version 0.3.0
    "lr 0.12": {"train.base_learning_rate": 0.12},
    "v1 augmentation (no blur)": {"data.augmentation": "moco_v1"},
    "projector hidden 512": {"model.projector_hidden_dim": 512},
    "projector with BN": {"model.projector_bn": True},
    "m 0.996": {"moco.momentum": 0.996},
    # One BN batch of 256 (TF's fused kernel) or 4 sub-batches of 64 instead of SplitBN's 8 of 32.
    "plain BN": {"model.norm": "bn"},
    "SplitBN 4 groups": {"model.split_bn_groups": 4},
    "SplitBN 16 groups": {"model.split_bn_groups": 16},  # plain BN < 4 groups < 8 at epoch 8
    # conv1 at stride 2: ~2.7x the step rate, so ~2.5x the epochs in the same time.
    "stem stride 2 35 epochs": {"model.stem_stride": 2, "train.epochs": 35,
                                "eval.knn_every_epochs": 5},
    "width 32 stem stride 2 12 epochs": {"model.width": 32, "model.stem_stride": 2,
                                         "train.epochs": 12},
    "SimCLR": {"moco.momentum_scope": "none", **_SIMCLR},
    "SimCLR + EMA": {"moco.momentum_scope": "full", **_SIMCLR},
    "SimCLR + projector EMA": {"moco.momentum_scope": "projector", **_SIMCLR},
    "SimCLR + EMA from layer3": {"moco.momentum_scope": "from:layer3", **_SIMCLR},
    # The study's best 5-epoch method, in the quickstart's time (1.2x its step: 12 epochs).
    "EMA from layer3 12 epochs": {"moco.momentum_scope": "from:layer3", "train.epochs": 12},
    # The two best k=20 changes together.
    "EMA from layer3 12 epochs projector with BN": {"moco.momentum_scope": "from:layer3",
                                                    "train.epochs": 12, "model.projector_bn": True},
    # The quickstart of version 0.2 (`configs/fashion_mnist.py:moco_v2`) and its variants.
    "MoCo v2": _MOCO_V2,
    "MoCo v2 crop 0.5-1": {**_MOCO_V2, "data.crop_scale": (0.5, 1.0)},
    "MoCo v2 K 16384": {**_MOCO_V2, "moco.queue_size": 16384},
    "MoCo v2 symmetric": {**_MOCO_V2, "moco.symmetric": True},
}

_OUT = flags.DEFINE_string("out", "runs/quickstart_sweep", "Output folder.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Variants to run (names above).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds per variant.")
_EPOCHS = flags.DEFINE_integer("epochs", 0, "Epochs per run; 0 = the quickstart's.")
_KNN_EVERY = flags.DEFINE_integer("knn_every", 0, "Epochs between kNN; 0 = the quickstart's.")
_LINEAR_EPOCHS = flags.DEFINE_integer("linear_epochs", 0, "Linear evaluation epochs; 0 = none.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time (each in its own process).")
_REPORT = flags.DEFINE_bool("report", False, "Only write the report from finished runs.")
_SMALL = flags.DEFINE_bool("small", False, "Tiny synthetic runs (to check the script).")
_CURVE = flags.DEFINE_string("curve", "", "Only plot a finished train.py workdir's kNN curve "
                             "(its results.json) to <workdir>/knn.png.")
_RUN = flags.DEFINE_string("run", "", "Internal: 'variant|seed' to run in this process.")


def slug(name):
    return "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in name.lower()).strip("_")


def run_dir(name, seed):
    return os.path.join(_OUT.value, "runs", slug(name), f"seed{seed}")


def make_config(name, seed):
    from moco_tf import config as config_lib

    config = fashion_mnist.get_config()
    config.update_from_flattened_dict(dict(VARIANTS[name]))
    config.seed = int(seed)
    if _EPOCHS.value:
        config.train.epochs = _EPOCHS.value
    if _KNN_EVERY.value:
        config.eval.knn_every_epochs = _KNN_EVERY.value
    config.train.verbose = 2
    if _SMALL.value:
        common.shrink(config)
    return config_lib.validate(config)


def run_one(name, seed):
    """Trains, evaluates and records one (variant, seed); resumes if stopped."""
    from moco_tf import train_lib
    from moco_tf.eval import linear

    config, workdir = make_config(name, seed), run_dir(name, seed)
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    _, results = train_lib.train_and_evaluate(config, workdir)
    results.update(variant=name, overrides=VARIANTS[name], seed=int(seed),
                   wall_seconds=round(time.perf_counter() - start, 1))
    if _LINEAR_EPOCHS.value:
        results["linear_top1"] = linear.evaluate(
            results["export_dir"], config, epochs=_LINEAR_EPOCHS.value)["top1"]
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump(results, f, indent=2)


def load_runs():
    runs = []
    for name in VARIANTS:
        for seed in _SEEDS.value:
            path = os.path.join(run_dir(name, seed), "sweep.json")
            if os.path.exists(path):
                runs.append(json.load(open(path)))
    return runs


def write_report(runs):
    runs = sorted(runs, key=lambda r: -r["knn_top1"])
    with open(os.path.join(_OUT.value, "sweep.json"), "w") as f:
        json.dump(runs, f, indent=2)
    pct = lambda v: "–" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    lines = ["| variant | seed | epochs | kNN k=200 | kNN k=20 | linear | train time | img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['epochs']} | {pct(r['knn_top1'])} | "
                     f"{pct(r['knn_top1_k20'])} | {pct(r.get('linear_top1'))} | "
                     f"{r['train_seconds'] / 60:.1f} min | {r['images_per_sec']:.0f} |")
    with open(os.path.join(_OUT.value, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(runs, os.path.join(_OUT.value, "knn.png"))


def plot(runs, path):
    """kNN top-1 (k=200 solid, k=20 dashed) against epoch, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        epochs = [e["epoch"] for e in r["knn_per_epoch"]]
        line, = ax.plot(epochs, [100 * e["k200"] for e in r["knn_per_epoch"]], marker="o",
                        label=r["variant"] + ("" if r["seed"] is None else f" (seed {r['seed']})"))
        ax.plot(epochs, [100 * e["k20"] for e in r["knn_per_epoch"]], ls="--",
                color=line.get_color())
    pixels = runs[0].get("knn_top1_raw_pixels") if len(runs) == 1 else None
    for k, ls in (("k200", "-"), ("k20", "--")):
        if pixels:  # the baseline the features should beat
            ax.axhline(100 * pixels[k], color="gray", ls=ls, lw=1,
                       label="raw pixels" if k == "k200" else None)
    ax.set(xlabel="epoch", ylabel="kNN top-1 (%)  — k=200 solid, k=20 dashed",
           title="Fashion-MNIST test split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
    if unknown:
        raise app.UsageError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if _CURVE.value:
        with open(os.path.join(_CURVE.value, "results.json")) as f:
            run = json.load(f)
        name = os.path.basename(os.path.normpath(_CURVE.value))
        return plot([{**run, "variant": name, "seed": None}], os.path.join(_CURVE.value, "knn.png"))
    os.makedirs(_OUT.value, exist_ok=True)
    if _RUN.value:
        name, seed = _RUN.value.split("|")
        return run_one(name, seed)
    if not _REPORT.value:
        todo = [(n, s) for n in _VARIANTS.value for s in _SEEDS.value
                if not os.path.exists(os.path.join(run_dir(n, s), "sweep.json"))]
        passed = [f"--{f}={getattr(flags.FLAGS, f)}"
                  for f in ("out", "epochs", "knn_every", "linear_epochs", "small")]
        common.run_processes(
            [(f"{slug(n)}_seed{s}", [os.path.abspath(__file__), f"--run={n}|{s}", *passed])
             for n, s in todo], _PARALLEL.value, _OUT.value)
    runs = load_runs()
    if runs:
        write_report(runs)


if __name__ == "__main__":
    app.run(main)

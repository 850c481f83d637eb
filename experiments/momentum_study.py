"""The momentum-encoder study (Pham et al. 2022) on Fashion-MNIST, measured on our own runs.

Trains MoCo v2, SimCLR, SimCLR + EMA and projector-only EMA with the same data, backbone, optimizer,
epochs, batch and seed (only the method switches differ: configs/*.py `:fashion_mnist`) and writes
to --out:
  results.json, results.md   kNN top-1 (k=200, k=20), images/s, wall time per method
  knn.png                    kNN top-1 (k=200) after every epoch, one line per method
  fluctuation.png            per-block fluctuation of dLoss/d(block output) over training

Fluctuation (the paper's measure, made concrete): every `--probe_every` steps the gradient of the
method's own loss with respect to each block's output is computed on one fixed probe batch; a
block's fluctuation is the mean relative change of that gradient between consecutive probes,
||g_t - g_{t-1}|| / ||g_{t-1}||. The paper's finding: it grows towards the final layers.

  python experiments/momentum_study.py --epochs=3 --steps_per_epoch=80 --probe_every=10 \
      --out=runs/momentum_study    # the README's run: ~40 min on 2 cores
  python experiments/momentum_study.py --epochs=4 --out=runs/momentum_study    # 4 full epochs: ~1.5 h
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import fashion_mnist, projector_momentum, simclr, simclr_momentum  # noqa: E402
from moco_tf import data, train_lib  # noqa: E402

METHODS = {
    "MoCo v2": lambda: fashion_mnist.get_config(),
    "SimCLR": lambda: simclr.get_config("fashion_mnist"),
    "SimCLR + EMA": lambda: simclr_momentum.get_config("fashion_mnist"),
    "Projector-only EMA": lambda: projector_momentum.get_config("fashion_mnist"),
}

_OUT = flags.DEFINE_string("out", "runs/momentum_study", "Output folder.")
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs per method.")
_STEPS = flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch (None = full).")
_PROBE_EVERY = flags.DEFINE_integer("probe_every", 25, "Steps between gradient probes.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Which methods to run.")
_SMALL = flags.DEFINE_bool("small", False, "Tiny synthetic run (to check the script).")


def block_names(backbone):
    """The stem and every residual block's output, in order (torchvision names)."""
    names = [l.name for l in backbone.layers if l.name == "relu" or l.name.endswith(".out")]
    return names or [l.name for l in backbone.layers if l.name.startswith("relu")]


class GradientFluctuation(keras.callbacks.Callback):
    """Relative change of dLoss/d(block output) between probes, on a fixed probe batch."""

    def __init__(self, probe_views, every):
        super().__init__()
        self.probe, self.every = probe_views, every
        self.previous, self.changes = None, {}

    def on_train_begin(self, logs=None):
        model = self.model
        self.names = block_names(model.backbone) + ["projector"]
        taps = [model.backbone.get_layer(n).output for n in self.names[:-1]]
        self._tapped = keras.Model(model.backbone.input, taps + [model.backbone.output])
        self._gradients = tf.function(self._block_gradients)

    def _block_gradients(self, x1, x2):
        model = self.model
        with tf.GradientTape() as tape:
            *blocks, h1 = self._tapped(x1, training=True)
            z = model.projector(h1, training=True)
            tape.watch(z)
            if model.predictor is not None:
                z_q = model.predictor(z, training=True)
            else:
                z_q = z
            q1 = tf.math.l2_normalize(tf.cast(z_q, tf.float32), 1)
            h2 = model.backbone(x2, training=True)
            k2 = model._key(x2, h2)
            k1 = model._key(x1, h1, view=1) if model.symmetric else None
            loss, _ = model._contrast(q1, k2, k1)
            loss = tf.reduce_mean(loss)
        return tape.gradient(loss, blocks + [z])

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every:
            return
        grads = [np.asarray(g, np.float32) for g in self._gradients(self.probe["view1"], self.probe["view2"])]
        if self.previous is not None:
            for name, g, g_old in zip(self.names, grads, self.previous):
                change = np.linalg.norm(g - g_old) / (np.linalg.norm(g_old) + 1e-12)
                self.changes.setdefault(name, []).append(float(change))
        self.previous = grads

    def summary(self):
        return {name: float(np.mean(v)) for name, v in self.changes.items()}


def run_method(name, config, out):
    config.train.epochs = _EPOCHS.value
    config.train.steps_per_epoch = _STEPS.value
    config.train.verbose = 2
    config.eval.knn_every_epochs = 1
    config.eval.raw_pixel_baseline = False
    config.eval.export = False
    if _SMALL.value:
        config.data.source, config.data.image_size, config.data.num_classes = "synthetic", 16, 4
        config.data.mean, config.data.std = (0.5,), (0.25,)
        config.model.backbone, config.moco.queue_size = "resnet18", 512
        config.train.batch_size, config.eval.knn_ks = 32, (20, 5)
    probe = next(iter(data.train_dataset(config.data, 64, seed=12345)))
    fluctuation = GradientFluctuation(probe, _PROBE_EVERY.value)
    start = time.perf_counter()
    _, results = train_lib.train_and_evaluate(
        config, os.path.join(out, name.replace(" ", "_").replace("+", "plus")),
        callbacks=[fluctuation],
    )
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    results["fluctuation"] = fluctuation.summary()
    results["blocks"] = fluctuation.names
    return results


def write_report(all_results, out):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(all_results, f, indent=2)
    ks = [k for k in next(iter(all_results.values())) if k.startswith("knn_top1_k")]
    lines = ["| method | kNN top-1 k=200 | " + " | ".join(f"k={k[10:]}" for k in ks)
             + " | images/s | wall time |", "|---" * (4 + len(ks)) + "|"]
    for name, r in all_results.items():
        lines.append(
            f"| {name} | {100 * r['knn_top1']:.2f}% | "
            + " | ".join(f"{100 * r[k]:.2f}%" for k in ks)
            + f" | {r['images_per_sec']:.0f} | {r['wall_seconds'] / 60:.1f} min |"
        )
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in all_results.items():
        epochs = [e["epoch"] for e in r["knn_per_epoch"]]
        ax.plot(epochs, [100 * e[next(k for k in e if k != "epoch")] for e in r["knn_per_epoch"]],
                marker="o", label=name)
    ax.set(xlabel="epoch", ylabel="kNN top-1 (%), k=200", title="Fashion-MNIST, same budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "knn.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in all_results.items():
        blocks = r["blocks"]
        ax.plot(range(len(blocks)), [r["fluctuation"].get(b, np.nan) for b in blocks],
                marker="o", label=name)
    ax.set_xticks(range(len(blocks)), blocks, rotation=45, ha="right")
    ax.set(ylabel="mean relative change of dL/d(output)",
           title="Gradient fluctuation per block (input → output)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fluctuation.png"), dpi=120)


def main(argv):
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    all_results = {}
    for name in _METHODS.value:
        print(f"=== {name} ===", flush=True)
        all_results[name] = run_method(name, METHODS[name](), _OUT.value)
        write_report(all_results, _OUT.value)  # after every method: partial results survive


if __name__ == "__main__":
    app.run(main)

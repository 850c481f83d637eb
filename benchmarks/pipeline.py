"""Two-view MoCo v2 input pipeline throughput: ours (tf.data) vs a torchvision DataLoader, and
whether the quickstart's training is input-bound.

Datasets: `fashion_mnist` (the quickstart's data: 28x28x1, crop scale 0.3-1, from the IDX files;
synthetic images of that shape if they are not installed) and `rgb32` (32x32x3 synthetic images,
CIFAR-sized, crop scale 0.2-1). Ours is `moco_tf.data.train_dataset` exactly as training uses it
(cache, shuffle, repeat, batch, per-image augmentation of the whole batch, prefetch). The torch
side is the official MoCo v2 "aug+" on PIL images (RandomResizedCrop, ColorJitter(.4,.4,.4,.1)
p=.8, RandomGrayscale .2, PIL GaussianBlur sigma in [.1, 2] p=.5, flip, ToTensor) in a DataLoader
with 2 workers; it runs in a child process that does not load TensorFlow. Neither side
normalises (ours does it inside the model). Rates are images per second (each image gives two
views), measured for `--seconds` after a few warm-up batches.

Input-bound check: the quickstart model (configs/fashion_mnist.py) is timed by `fit` twice, on
cached in-memory batches and on the real pipeline; training is input-bound if feeding it from
the pipeline (which shares the 2 cores) costs more than 5% of the step rate.
`--step-img-s N` skips that and compares the pipeline's standalone rate with N instead.

    python benchmarks/pipeline.py > pipeline.json                  # ~3 min on 2 idle cores
    python benchmarks/pipeline.py --seconds 1 --batch 16 --examples 512 \\
        --step-config fashion_mnist:smoke --step-steps 2           # smoke run
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# TensorFlow is imported inside functions: the torch child process must not load it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# name -> (image size, channels, crop scale); fashion_mnist's crop scale is the quickstart's.
DATASETS = {"fashion_mnist": (28, 1, (0.3, 1.0)), "rgb32": (32, 3, (0.2, 1.0))}
INPUT_BOUND_SLOWDOWN = 0.05  # fit on the pipeline this much slower than on cached batches


def measure_rate(iterator, batch_size, seconds, warmup_batches=3):
    """Images per second drawn from `iterator` (batches of `batch_size`) over `seconds`."""
    for _ in range(warmup_batches):  # shuffle-buffer fill, worker start-up, tracing
        next(iterator)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        n += batch_size
    return round(n / (time.perf_counter() - start), 1)


def data_config(name, args):
    """The `data` config section of dataset `name` (the quickstart's for fashion_mnist)."""
    from configs import fashion_mnist

    size, channels, scale = DATASETS[name]
    d = fashion_mnist.get_config().data
    d.image_size, d.channels, d.crop_scale = size, channels, scale
    if name == "rgb32" or args.synthetic or not os.path.isdir(FASHION_MNIST_DIR):
        d.source, d.synthetic_examples, d.num_classes = "synthetic", args.examples, 10
        d.mean, d.std = (0.5,) * channels, (0.25,) * channels
    return d


def our_pipeline_rate(name, args):
    from moco_tf import data as data_lib

    ds = data_lib.train_dataset(data_config(name, args), args.batch, seed=0)
    return measure_rate(iter(ds), args.batch, args.seconds)


def source_images(name, args):
    """uint8 [N, H, W, C] images of dataset `name`, the ones our pipeline reads."""
    from moco_tf.data import datasets

    d = data_config(name, args)
    if d.source == "fashion_mnist":
        return datasets.read_fashion_mnist(d.data_dir or FASHION_MNIST_DIR, "train")[0][..., None]
    return datasets.make_synthetic(args.examples, d.image_size, d.channels, d.num_classes)[0]


# --- the torch side (child process) -------------------------------------------------------------


def torch_loader(images, crop_scale, batch_size, workers):
    """The official MoCo v2 aug+ two-crop DataLoader over uint8 images [N, H, W, C]."""
    import random

    import torch
    from PIL import Image, ImageFilter
    from torchvision import transforms as T

    class GaussianBlur:  # moco/loader.py: PIL blur with a random sigma
        def __call__(self, x):
            return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    size = images.shape[1]
    augment = T.Compose([
        T.RandomResizedCrop(size, scale=crop_scale),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur()], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
    ])

    class TwoCrops(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            img = images[i]
            img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            return augment(img), augment(img)

    return torch.utils.data.DataLoader(
        TwoCrops(), batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0)


def torch_rate(images_file, crop_scale, args):
    import numpy as np

    images = np.load(images_file)
    loader = torch_loader(images, tuple(crop_scale), args.batch, args.workers)

    def forever():
        while True:
            yield from loader

    return measure_rate(forever(), args.batch, args.seconds)


def run_torch_child(name, images, args):
    """torch_rate in a fresh process (no TensorFlow threads or memory in it); None on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.npy")
        import numpy as np

        np.save(path, images)
        cmd = [sys.executable, os.path.abspath(__file__), "--child-torch", path,
               "--crop-scale", *map(str, DATASETS[name][2]), "--batch", str(args.batch),
               "--seconds", str(args.seconds), "--workers", str(args.workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        print(f"[pipeline.py] torch {name} failed: {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])["img_s"]


# --- is the quickstart input-bound? -------------------------------------------------------------


def _load_step_module():
    """benchmarks/step.py (benchmarks/ is not a package): its fit timer."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step.py")
    spec = importlib.util.spec_from_file_location("moco_tf_benchmark_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quickstart_step(args, pipeline_rate):
    """The quickstart model's fit img/s on cached batches and on the real pipeline."""
    import importlib

    import keras
    import tensorflow as tf

    from moco_tf import data as data_lib
    from moco_tf import train_lib

    step = _load_step_module()
    module, _, variant = args.step_config.partition(":")
    config = importlib.import_module(f"configs.{module}").get_config(variant)
    config.data = data_config("fashion_mnist", args)
    batch = config.train.batch_size

    def train():
        return data_lib.train_dataset(config.data, batch, seed=0)

    # A few real batches, kept in memory: the step without any input cost.
    cached = list(train().take(4))
    cached = tf.data.Dataset.from_tensor_slices(
        {k: tf.stack([b[k] for b in cached]) for k in cached[0]}).cache().repeat()
    keras.utils.set_random_seed(0)
    try:
        model = train_lib.build_model(config)
        spe = config.train.steps_per_execution
        rates = {}
        for label, ds in (("cached", cached), ("pipeline", train())):
            per_step, _ = step.time_fit(model, ds, args.step_warmup, args.step_steps, spe)
            rates[label] = round(batch / sorted(per_step)[len(per_step) // 2], 1)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    slowdown = 1 - rates["pipeline"] / rates["cached"]
    return {
        "quickstart_step_img_s": rates["cached"],
        "quickstart_fit_on_pipeline_img_s": rates["pipeline"],
        "quickstart_pipeline_slowdown_pct": round(100 * slowdown, 2),
        "quickstart_input_bound": bool(slowdown > INPUT_BOUND_SLOWDOWN),
        "quickstart_pipeline_headroom": round(pipeline_rate / rates["cached"], 2),
        "input_bound_method": "fit on the real pipeline vs on cached batches "
                              f"(input-bound if > {100 * INPUT_BOUND_SLOWDOWN:.0f}% slower)",
    }


# --- entry --------------------------------------------------------------------------------------


def run(argv=None):
    args = parse_args(argv)
    if args.child_torch:
        return {"img_s": torch_rate(args.child_torch, args.crop_scale, args)}
    names = args.datasets.split(",")
    out = {"settings": {"batch": args.batch, "seconds": args.seconds, "workers": args.workers,
                        "cpus": os.cpu_count()}}
    for name in names:
        d = data_config(name, args)
        out["settings"][name] = {"source": d.source, "image_size": d.image_size,
                                 "channels": d.channels, "crop_scale": list(d.crop_scale)}
        out[f"ours_{name}_img_s"] = our_pipeline_rate(name, args)
        print(f"[pipeline.py] ours {name}: {out[f'ours_{name}_img_s']} img/s", file=sys.stderr)
        if not args.no_torch:
            rate = run_torch_child(name, source_images(name, args), args)
            if rate:
                out[f"torch_{name}_img_s"] = rate
                out[f"ours_vs_torch_{name}"] = round(out[f"ours_{name}_img_s"] / rate, 2)
                print(f"[pipeline.py] torch {name}: {rate} img/s", file=sys.stderr)
    targets = [{"target": f"pipeline ours / torchvision ({n})", "value": out[f"ours_vs_torch_{n}"],
                "op": ">=", "bound": 2.0, "pass": out[f"ours_vs_torch_{n}"] >= 2.0}
               for n in names if f"ours_vs_torch_{n}" in out]
    if "fashion_mnist" in names:
        rate = out["ours_fashion_mnist_img_s"]
        if args.step_img_s:
            out.update(quickstart_step_img_s=args.step_img_s,
                       quickstart_pipeline_headroom=round(rate / args.step_img_s, 2),
                       quickstart_input_bound=bool(rate < args.step_img_s),
                       input_bound_method="standalone pipeline rate vs the given step rate")
        elif not args.no_step:
            out.update(quickstart_step(args, rate))
        if "quickstart_input_bound" in out:
            targets.append({"target": "quickstart not input-bound",
                            "value": out["quickstart_pipeline_headroom"], "op": "not input-bound",
                            "bound": None, "pass": not out["quickstart_input_bound"]})
    out["targets"] = targets
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="fashion_mnist,rgb32",
                   help=f"comma list of {list(DATASETS)}")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    p.add_argument("--workers", type=int, default=2, help="torch DataLoader num_workers")
    p.add_argument("--examples", type=int, default=10000,
                   help="synthetic images (rgb32, or fashion_mnist with --synthetic)")
    p.add_argument("--synthetic", action="store_true", help="synthetic fashion_mnist-shaped data")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--step-config", default="fashion_mnist", help="configs/<name>[:variant]")
    p.add_argument("--step-img-s", type=float, default=0.0,
                   help="the quickstart's step img/s, instead of measuring it")
    p.add_argument("--step-steps", type=int, default=10)
    p.add_argument("--step-warmup", type=int, default=2)
    p.add_argument("--no-step", action="store_true", help="skip the input-bound check")
    p.add_argument("--child-torch", default="", help=argparse.SUPPRESS)
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.2, 1.0), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    out = run(argv)
    for c in out.get("targets", []):
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['target']}: {c['value']}", file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

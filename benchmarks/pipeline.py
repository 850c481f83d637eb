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

JPEG folders (`--source=jpeg_folder [--dir DIR]`, ImageNet-style input: 500x375 photo-like
JPEGs are made when no --dir is given): two 224-px MoCo v2 views per image, interleaved rounds
of (1) ours, `moco_tf.data.train_dataset` on the folder as training reads it; (2) the host part
left with `data.augment_on=device` (decode, crop, resize); (3) torchvision's DataLoader with the
official two-crop aug+ transforms (PIL, num_workers = cores) in a child process — give an
interpreter that has torchvision with --torch-python; (4) a decode-only bound (tf.data, one
full `decode_jpeg` per image, nothing else). Medians of --repeats rounds.

    python benchmarks/pipeline.py > pipeline.json                  # ~3 min on 2 idle cores
    python benchmarks/pipeline.py --source=jpeg_folder --torch-python=/path/venv/bin/python
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
    from moco_tf.data import fashion_mnist, synthetic

    d = data_config(name, args)
    if d.source == "fashion_mnist":
        return fashion_mnist.read_fashion_mnist(d.data_dir or FASHION_MNIST_DIR, "train")[0][..., None]
    return synthetic.make_synthetic(args.examples, d.image_size, d.channels, d.num_classes)[0]


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
        cmd = [args.torch_python or sys.executable, os.path.abspath(__file__), "--child-torch", path,
               "--crop-scale", *map(str, DATASETS[name][2]), "--batch", str(args.batch),
               "--seconds", str(args.seconds), "--workers", str(args.workers)]
        return _child_rate(cmd, f"torch {name}")


def _child_rate(cmd, what):
    """Runs a `--child-*` command; its last JSON line's `img_s`, or None if it failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        print(f"[pipeline.py] {what} failed: {proc.stderr[-2000:]}", file=sys.stderr)
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


# --- JPEG folders (ImageNet-style) ------------------------------------------------------------


def make_jpegs(folder, count, seed=0):
    """`count` photo-like 500x375 JPEGs (smooth colour fields plus grain, ~80 KB each) in
    folder/c0/, the size and compression of an average ImageNet training image."""
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.join(folder, "c0"), exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        image = np.asarray(coarse.resize((500, 375), Image.BICUBIC), np.float32)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(folder, "c0", f"{i:05d}.jpg"), quality=90)


def jpeg_data_config(folder, augment_on):
    from configs import moco_v2

    d = moco_v2.get_config().data
    d.source, d.data_dir, d.eval_dir, d.augment_on = "image_folder", folder, folder, augment_on
    return d


def jpeg_ours_rate(folder, augment_on, args):
    from moco_tf import data as data_lib

    ds = data_lib.train_dataset(jpeg_data_config(folder, augment_on), args.batch, seed=0)
    return measure_rate(iter(ds), args.batch, args.seconds)


def jpeg_decode_only_rate(folder, args):
    """The bound: every image read and fully decoded once by tf.data, nothing else."""
    import glob

    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(folder, "**", "*.jpg"), recursive=True))
    ds = (tf.data.Dataset.from_tensor_slices(files).repeat()
          .map(lambda f: tf.shape(tf.io.decode_jpeg(tf.io.read_file(f), channels=3)),
               num_parallel_calls=tf.data.AUTOTUNE)
          .batch(args.batch).prefetch(tf.data.AUTOTUNE))
    return measure_rate(iter(ds), args.batch, args.seconds)


def torch_folder_rate(folder, args):
    """torchvision's ImageFolder + the official MoCo v2 TwoCropsTransform, in a DataLoader."""
    import random

    import torch
    from PIL import ImageFilter
    from torchvision import datasets as tv_datasets
    from torchvision import transforms as T

    class GaussianBlur:  # moco/loader.py
        def __call__(self, x):
            return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    augment = T.Compose([
        T.RandomResizedCrop(224, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur()], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    dataset = tv_datasets.ImageFolder(folder, lambda x: [augment(x), augment(x)])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True,
        persistent_workers=args.workers > 0)

    def forever():
        while True:
            yield from loader

    return measure_rate(forever(), args.batch, args.seconds)


def run_torch_folder_child(folder, args):
    """torch_folder_rate in a fresh process of `--torch-python`; None if it fails."""
    cmd = [args.torch_python or sys.executable, os.path.abspath(__file__), "--child-torch-folder",
           folder, "--batch", str(args.batch), "--seconds", str(args.seconds),
           "--workers", str(args.workers)]
    return _child_rate(cmd, "torchvision")


def torchvision_missing(args):
    """Why `--torch-python` cannot run the torchvision reference, or "" if it can."""
    python = args.torch_python or sys.executable
    proc = subprocess.run([python, "-c", "import torch, torchvision"], capture_output=True,
                          text=True)
    if proc.returncode == 0:
        return ""
    last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return (f"{python} cannot import torchvision ({last}); give an interpreter that has it "
            f"with --torch-python")


def photometric_ms_per_image(args):
    """The photometric stage alone (both views, 224 px): the fused host path vs the plain one
    (the ops as they were before the fusion), ms per image on this machine."""
    import tensorflow as tf

    from moco_tf.data import augment

    views = tuple(tf.cast(tf.random.stateless_uniform([args.batch, 224, 224, 3], [k, 0], 0, 256),
                          tf.uint8) for k in range(2))
    out = {}
    for name, fast in (("fast", True), ("plain", False)):
        fn = tf.function(lambda s, fast=fast: augment.photometric(views, "moco_v2", s, fast=fast))
        step = iter(range(10**9))

        def batches():
            while True:
                yield [x.numpy() for x in fn(tf.constant([next(step), 0], tf.int64))]

        out[name] = round(1000.0 / measure_rate(batches(), args.batch, args.seconds), 3)
    return out


def jpeg_benchmark(args):
    import statistics
    import tempfile

    folder = args.dir
    tmp = None
    if not folder:
        tmp = tempfile.TemporaryDirectory()
        folder = tmp.name
        make_jpegs(folder, args.images)
    rounds = {"ours": [], "host_part_device_aug": [], "torchvision": [], "decode_only": []}
    torch_skipped = "--no-torch" if args.no_torch else torchvision_missing(args)
    for r in range(args.repeats):  # interleaved: machine load drifts affect all alike
        rounds["ours"].append(jpeg_ours_rate(folder, "host", args))
        rounds["host_part_device_aug"].append(jpeg_ours_rate(folder, "device", args))
        if not torch_skipped:
            rate = run_torch_folder_child(folder, args)
            if rate:
                rounds["torchvision"].append(rate)
        rounds["decode_only"].append(jpeg_decode_only_rate(folder, args))
        print(f"[pipeline.py] round {r + 1}: " + ", ".join(
            f"{k} {v[-1]}" for k, v in rounds.items() if v), file=sys.stderr)
    out = {"settings": {"source": "jpeg_folder", "dir": args.dir or f"{args.images} generated "
                        "500x375 JPEGs", "batch": args.batch, "seconds": args.seconds,
                        "repeats": args.repeats, "workers": args.workers,
                        "cpus": os.cpu_count()}}
    for name, rates in rounds.items():
        if rates:
            out[f"jpeg224_{name}_img_s"] = round(statistics.median(rates), 1)
            out[f"jpeg224_{name}_rounds"] = rates
    if not rounds["torchvision"]:  # always in the output: null, and why
        out["jpeg224_torchvision_img_s"] = None
        out["jpeg224_torchvision_skipped"] = torch_skipped or "every round failed (see stderr)"
    photometric = photometric_ms_per_image(args)
    out["photometric224_ms_per_image"] = photometric
    out["photometric224_speedup"] = round(photometric["plain"] / photometric["fast"], 2)
    targets = [{"target": "photometric stage >= 2x faster than the plain ops",
                "value": out["photometric224_speedup"], "op": ">=", "bound": 2.0,
                "pass": out["photometric224_speedup"] >= 2.0}]
    if out["jpeg224_torchvision_img_s"]:
        torch_rate = out["jpeg224_torchvision_img_s"]
        for key, bound in (("ours", 2.0), ("host_part_device_aug", 4.0)):
            ratio = round(out[f"jpeg224_{key}_img_s"] / torch_rate, 2)
            out[f"jpeg224_{key}_vs_torchvision"] = ratio
            targets.append({"target": f"{key} / torchvision", "value": ratio, "op": ">=",
                            "bound": bound, "pass": ratio >= bound})
    out["targets"] = targets
    if tmp is not None:
        tmp.cleanup()
    return out


# --- entry --------------------------------------------------------------------------------------


def run(argv=None):
    args = parse_args(argv)
    if args.child_torch:
        return {"img_s": torch_rate(args.child_torch, args.crop_scale, args)}
    if args.child_torch_folder:
        return {"img_s": torch_folder_rate(args.child_torch_folder, args)}
    if args.source == "jpeg_folder":
        return jpeg_benchmark(args)
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
    p.add_argument("--source", choices=("in_memory", "jpeg_folder"), default="in_memory",
                   help="in_memory: --datasets below; jpeg_folder: ImageNet-style JPEGs")
    p.add_argument("--dir", default="", help="jpeg_folder: a folder of class folders of JPEGs")
    p.add_argument("--images", type=int, default=300, help="jpeg_folder: JPEGs to make")
    p.add_argument("--repeats", type=int, default=3, help="jpeg_folder: interleaved rounds")
    p.add_argument("--torch-python", default="",
                   help="interpreter with torch + torchvision for the reference (default: this)")
    p.add_argument("--datasets", default="fashion_mnist,rgb32",
                   help=f"comma list of {list(DATASETS)}")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="torch DataLoader num_workers (default: the cores)")
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
    p.add_argument("--child-torch-folder", default="", help=argparse.SUPPRESS)
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

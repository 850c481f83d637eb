"""Per-image random-resized crop: keras-cv RandomCropAndResize vs one batched crop_and_resize;
and, for JPEGs, where to crop: before or after decoding.

Also times the full Fashion-MNIST moco_v2 training pipeline if the IDX files are installed.
Prints one JSON object (images per second). A few seconds per measurement:
    python benchmarks/pipeline_crop.py [--seconds 3]
    python benchmarks/pipeline_crop.py --jpeg [--seconds 10 --repeats 3]   # crop-before-decode

`--jpeg`: 300 photo-like 500x375 JPEGs (benchmarks/pipeline.py makes them), two MoCo v2 crop
windows per image (torchvision's rule, scale 0.2-1), each resized to 224, in tf.data (parallel
map, batch 32); images/s and CPU ms per image (process time over images) in interleaved rounds
of: the whole image decoded once and both windows sliced
from it; one `decode_and_crop_jpeg` of the union box of the two windows, both sliced from it
(what the records pipeline does); one `decode_and_crop_jpeg` per window.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections  # noqa: E402
import tensorflow as tf  # noqa: E402

from moco_tf.data import augment, fashion_mnist, pipeline  # noqa: E402


def rate(fn, batch_size, seconds):
    fn()  # trace / warm up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += batch_size
    return round(n / (time.perf_counter() - start), 1)


def crop_benchmark(size, batch_size, seconds):
    import keras_cv

    stored = size if size <= 64 else round(size / 0.875)  # a little larger than the crop
    images = tf.random.uniform([batch_size, stored, stored, 3], 0, 256, tf.int32)
    images = tf.cast(images, tf.uint8)
    layer = keras_cv.layers.RandomCropAndResize(
        target_size=(size, size), crop_area_factor=(0.2, 1.0), aspect_ratio_factor=(3 / 4, 4 / 3))
    kcv = tf.function(lambda x: layer(tf.cast(x, tf.float32) / 255.0, training=True))
    ours = tf.function(lambda x, s: augment.crop_views(
        x, "crop", image_size=size, crop_scale=(0.2, 1.0), seed=s)[0])
    step = tf.Variable(0, dtype=tf.int64)

    def run_ours():
        step.assign_add(1)
        return ours(images, tf.stack([step, step])).numpy()

    return {
        "keras_cv_RandomCropAndResize": rate(lambda: kcv(images).numpy(), batch_size, seconds),
        "batched_crop_and_resize": rate(run_ours, batch_size, seconds),
    }


def pipeline_benchmark(batch_size, seconds):
    cfg = ml_collections.ConfigDict(dict(
        source="fashion_mnist", name="", data_dir="", train_split="train", eval_split="test",
        eval_dir="", image_size=28, channels=1, augmentation="moco_v2", crop_scale=(0.2, 1.0),
        cache=True, shuffle_buffer=10000, synthetic_examples=256, num_classes=10))
    it = iter(pipeline.train_dataset(cfg, batch_size, seed=0))
    return rate(lambda: next(it), batch_size, seconds)


def jpeg_crop_benchmark(seconds, repeats, batch_size=32, count=300):
    """img/s of the three ways to get two 224-px crops of a JPEG (module docstring)."""
    import importlib.util
    import statistics
    import tempfile

    from moco_tf.data import crops, records

    spec = importlib.util.spec_from_file_location(
        "moco_tf_benchmark_pipeline", os.path.join(os.path.dirname(__file__), "pipeline.py"))
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)

    def two_windows(contents, seed):
        shape = tf.io.extract_jpeg_shape(contents)
        return crops.crop_windows(seed, shape[0], shape[1], 2, (0.2, 1.0))

    def resized(region, window):
        top, left, h, w = tf.unstack(window)
        return records.resize_to(region[top:top + h, left:left + w], 224)

    def whole(contents, seed):
        image = tf.io.decode_jpeg(contents, channels=3)
        return tuple(resized(image, w) for w in tf.unstack(two_windows(contents, seed)))

    def union(contents, seed):
        windows = two_windows(contents, seed)
        top, left = tf.reduce_min(windows[:, 0]), tf.reduce_min(windows[:, 1])
        box = tf.stack([top, left, tf.reduce_max(windows[:, 0] + windows[:, 2]) - top,
                        tf.reduce_max(windows[:, 1] + windows[:, 3]) - left])
        region = tf.io.decode_and_crop_jpeg(contents, box, channels=3)
        return tuple(resized(region, w) for w in tf.unstack(windows - tf.stack(
            [box[0], box[1], 0, 0])))

    def per_view(contents, seed):
        out = []
        for w in tf.unstack(two_windows(contents, seed)):
            region = tf.io.decode_and_crop_jpeg(contents, w, channels=3)
            out.append(records.resize_to(region, 224))
        return tuple(out)

    modes = {"whole_decode_two_slices": whole, "union_decode_and_crop": union,
             "decode_and_crop_per_view": per_view}
    rounds = {name: [] for name in modes}
    with tempfile.TemporaryDirectory() as folder:
        make.make_jpegs(folder, count)
        files = sorted(os.path.join(folder, "c0", f) for f in os.listdir(os.path.join(folder, "c0")))
        for _ in range(repeats):  # interleaved: load drifts affect every mode alike
            for name, fn in modes.items():
                ds = (tf.data.Dataset.from_tensor_slices(files).repeat().enumerate()
                      .map(lambda i, f, fn=fn: fn(tf.io.read_file(f), tf.stack([i, i])),
                           num_parallel_calls=tf.data.AUTOTUNE)
                      .batch(batch_size).prefetch(tf.data.AUTOTUNE))
                it = iter(ds)
                cpu = time.process_time()
                images_s = rate(lambda it=it: next(it), batch_size, seconds)
                # CPU time per image: what the decode costs, less swayed than the rate by
                # other processes on the cores.
                cpu_ms = 1000 * (time.process_time() - cpu) / (images_s * seconds + batch_size)
                rounds[name].append((images_s, round(cpu_ms, 3)))
    out = {}
    for name, r in rounds.items():
        out[f"jpeg224_two_crops_{name}_img_s"] = statistics.median(x for x, _ in r)
        out[f"jpeg224_two_crops_{name}_cpu_ms_per_image"] = statistics.median(c for _, c in r)
        out[f"jpeg224_two_crops_{name}_rounds"] = r
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--jpeg", action="store_true", help="only the crop-before-decode rounds")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.jpeg:
        print(json.dumps(jpeg_crop_benchmark(args.seconds, args.repeats)))
        return
    out = {
        "crop_28px_batch256_img_per_s": crop_benchmark(28, 256, args.seconds),
        "crop_224px_batch64_img_per_s": crop_benchmark(224, 64, args.seconds),
    }
    if os.path.isdir(fashion_mnist.DEFAULT_FASHION_MNIST_DIR):
        out["fashion_mnist_moco_v2_pipeline_batch256_img_per_s"] = pipeline_benchmark(
            256, args.seconds)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

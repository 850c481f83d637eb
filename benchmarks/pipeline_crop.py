"""Per-image random-resized crop: keras-cv RandomCropAndResize vs one batched crop_and_resize.

Also times the full Fashion-MNIST moco_v2 training pipeline if the IDX files are installed.
Prints one JSON object (images per second). A few seconds per measurement:
    python benchmarks/pipeline_crop.py [--seconds 3]
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
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

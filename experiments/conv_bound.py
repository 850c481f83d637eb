"""How close the MoCo step comes to what its convolution kernels allow, for TF and PyTorch.

benchmarks/profile_step.py on the fp32 step on this CPU: convolutions (forward, backward to the
input, backward to the filter) are 86% of the op time, BN 9%, everything else 5%. Both frameworks
run them with oneDNN. Timing every conv kernel of the model alone at its shape (forward x2 for
the query and key encoders, backward to the input and to the filter) and summing gives the
fastest step those kernels allow: a step running them one after the other cannot be faster
(running two at once, as TF's executor does, gains a few percent at most). `step / bound` is the
share of that limit a step reaches. TF's kernels are timed for our model (`benchmarks/step.py`'s
step shape), PyTorch's for the reference's ResNet-18 (the faster of NCHW and channels-last per
kernel). A one-off investigation; its numbers are in docs/performance.md.

  python experiments/conv_bound.py > bound.json                       # ~5 min on 2 idle cores
  python experiments/conv_bound.py --step-json=step.json > bound.json # + the share each step reaches
  python experiments/conv_bound.py --size 8 --batch 8 --repeats 2 --backbone small_cnn   # smoke
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import step  # noqa: E402  (the step's shape: moco_config, the torch reference)


def _median_seconds(fn, repeats):
    fn()  # the first call traces / creates the oneDNN primitive
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bound_step_seconds(convs, time_kernels):
    """Seconds per MoCo step spent in conv kernels, from each kernel's time alone.

    convs: [(shape, needs_input_grad)], one per conv layer of the encoder, in order.
    time_kernels(shape) -> (forward, backward-to-input, backward-to-filter) seconds.
    A step runs every conv forward twice (query and key encoder) and backward once; the first
    conv's input is the image, whose gradient nobody asks for.
    """
    timings, total = {}, 0.0
    for shape, needs_input_grad in convs:
        if shape not in timings:
            timings[shape] = time_kernels(shape)
        forward, to_input, to_filter = timings[shape]
        total += 2 * forward + to_filter + (to_input if needs_input_grad else 0.0)
    return total


def tf_conv_shapes(model):
    """[((H, W, C_in, C_out, kernel, stride, padding), needs_input_grad)] of the query backbone."""
    import keras

    convs = [layer for layer in model.backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    return [((*(int(d) for d in layer.input.shape[1:]), layer.filters, layer.kernel_size[0],
              layer.strides[0], layer.padding.upper()), i > 0) for i, layer in enumerate(convs)]


def tf_conv_kernels(batch, repeats):
    """time_kernels(shape) for TF's conv ops (oneDNN on x86), float32, NHWC as in the model."""
    import tensorflow as tf

    def time_kernels(shape):
        h, w, c_in, c_out, k, stride, padding = shape
        x = tf.random.uniform([batch, h, w, c_in])
        f = tf.random.uniform([k, k, c_in, c_out])
        strides = [1, stride, stride, 1]
        dy = tf.random.uniform(tf.nn.conv2d(x, f, strides, padding).shape)
        # One element out: reading it waits for the kernel without timing a copy of the output.
        kernels = [
            tf.function(lambda: tf.nn.conv2d(x, f, strides, padding)[0, 0, 0, 0]),
            tf.function(lambda: tf.raw_ops.Conv2DBackpropInput(
                input_sizes=x.shape, filter=f, out_backprop=dy, strides=strides,
                padding=padding)[0, 0, 0, 0]),
            tf.function(lambda: tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=f.shape, out_backprop=dy, strides=strides,
                padding=padding)[0, 0, 0, 0]),
        ]
        return tuple(_median_seconds(lambda fn=fn: float(fn()), repeats) for fn in kernels)

    return time_kernels


def torch_conv_shapes(size):
    """The reference model's convs, as tf_conv_shapes (padding is torch's integer padding)."""
    import torch
    import torch.nn as nn

    net, convs = step._torch_backbone("resnet18_cifar", 128), []

    def record(module, inputs, output):
        _, c_in, h, w = inputs[0].shape
        convs.append(((h, w, c_in, module.out_channels, module.kernel_size[0], module.stride[0],
                       module.padding[0]), bool(convs)))

    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(record)
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, size, size))
    return convs


def torch_conv_kernels(batch, repeats):
    """time_kernels(shape) for PyTorch's conv ops (oneDNN on x86), float32: per kernel the faster
    of NCHW (eager's layout) and channels-last (which torch.compile's layout optimisation picks;
    it is up to 2x faster for some of these shapes here)."""
    import torch
    import torch.nn.functional as F

    def time_layout(shape, layout):
        h, w, c_in, c_out, k, stride, pad = shape
        x = torch.rand(batch, c_in, h, w).to(memory_format=layout)
        f = torch.rand(c_out, c_in, k, k).to(memory_format=layout)
        with torch.no_grad():
            dy = torch.rand_like(F.conv2d(x, f, None, stride, pad)).to(memory_format=layout)

            def backward(mask):  # the op autograd calls for a conv's backward
                return torch.ops.aten.convolution_backward(
                    dy, x, f, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, mask)

            return (_median_seconds(lambda: F.conv2d(x, f, None, stride, pad), repeats),
                    _median_seconds(lambda: backward([True, False, False]), repeats),
                    _median_seconds(lambda: backward([False, True, False]), repeats))

    def time_kernels(shape):
        layouts = [time_layout(shape, m) for m in (torch.contiguous_format, torch.channels_last)]
        return tuple(map(min, *layouts))

    return time_kernels


def measure(framework, args):
    """{img_s, convs, distinct_shapes}: the step rate if only `framework`'s conv kernels took time."""
    if framework == "tf":
        from moco_tf import train_lib

        convs = tf_conv_shapes(train_lib.build_model(step.moco_config(args)))
        time_kernels = tf_conv_kernels(args.batch, args.repeats)
    else:
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        convs = torch_conv_shapes(args.size)
        time_kernels = torch_conv_kernels(args.batch, args.repeats)
    seconds = bound_step_seconds(convs, time_kernels)
    return {"img_s": round(args.batch / seconds, 2), "step_s": round(seconds, 4),
            "convs": len(convs), "distinct_shapes": len({shape for shape, _ in convs})}


# Which step of benchmarks/step.py's JSON each bound limits.
STEPS = {"tf": ("fit_fp32", "backbone_only"), "torch": ("torch_eager", "torch_compile")}


def run(argv=None):
    p = step.add_step_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--repeats", type=int, default=8, help="timings per kernel (median)")
    p.add_argument("--frameworks", default="tf,torch", help="tf, torch or both")
    p.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    p.add_argument("--step-json", default="", help="benchmarks/step.py output: add the share of "
                                                    "the bound each measured step reaches")
    args = p.parse_args(argv)
    measured = json.load(open(args.step_json)) if args.step_json else {}
    out = {"settings": {"size": args.size, "batch": args.batch, "width": args.width,
                        "backbone": args.backbone, "repeats": args.repeats}}
    for framework in args.frameworks.split(","):
        out[f"{framework}_conv_bound"] = bound = measure(framework, args)
        for mode in STEPS[framework]:
            if f"{mode}_img_s" in measured:
                bound[f"{mode}_pct_of_bound"] = round(
                    100 * measured[f"{mode}_img_s"] / bound["img_s"], 1)
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))

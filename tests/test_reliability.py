"""Reliability: each test feeds the bad thing for real — broken image files, config mistakes on the
command line, a diverging learning rate, a NaN pixel, a full and a read-only disk, a second run on
a locked workdir, an allocation too large for any machine — and checks the error says what to do
and that nothing already saved is lost."""
import contextlib
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from moco_tf import callbacks as callbacks_lib
from moco_tf import checkpoint as checkpoint_lib
from moco_tf import config as config_lib
from moco_tf import data, errors, train_lib
from moco_tf import workdir as workdir_lib
from moco_tf.config import DataError
from moco_tf.data import image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import synthetic  # noqa: E402


def small_config(**train):
    """configs/synthetic.py without evaluation or export: only the training loop."""
    c = synthetic.get_config()
    c.eval.knn_every_epochs = 0
    c.eval.export = False
    c.train.verbose = 0
    for key, value in train.items():
        c.train[key] = value
    return c


@contextlib.contextmanager
def tmpfs(path, size="1m", options=""):
    """A real small file system at `path` (root only); skips the test when mount is refused."""
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ----------------------------------------------------------------------------- image folders


def _save(path, array, mode=None, **kwargs):
    image = Image.fromarray(np.asarray(array))
    (image.convert(mode) if mode else image).save(path, **kwargs)


def _noise_image(path, fmt):
    """A noisy 64x64 image: big enough that cutting it in half truncates the pixel data."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path.read_bytes()


def make_messy_folder(root):
    """Two classes, each with good images of every kind and bad files. Returns the expected
    (label, RGB colour) of the good images in file order."""
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    expected = []
    # a: gray, 16-bit gray, RGB JPEG, RGBA — and a truncated JPEG, an HTML page saved as .jpg
    _save(a / "1_gray.png", np.full((12, 12), 90, np.uint8))
    expected.append((0, (90, 90, 90)))
    _save(a / "2_sixteen_bit.png", np.full((9, 9), 32768, np.uint16))  # PIL mode I;16
    expected.append((0, (128, 128, 128)))  # 32768 * 255 / 65535
    _save(a / "3_rgb.jpg", np.full((20, 30, 3), (200, 40, 10), np.uint8), quality=95)
    expected.append((0, (200, 40, 10)))
    _save(a / "4_rgba.png", np.full((10, 14, 4), (10, 200, 30, 0), np.uint8))  # alpha dropped
    expected.append((0, (10, 200, 30)))
    jpeg = _noise_image(a / "5_truncated.jpg", "JPEG")
    (a / "5_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (a / "6_page.jpg").write_text("<html><body>404 Not Found</body></html>")
    (a / "notes.txt").write_text("no image extension: ignored, not counted")
    # b: CMYK JPEG, palette GIF, TIFF, a 2x3 image (smaller than any crop) — and a truncated
    # PNG, a PNG with corrupt pixel data, an empty file
    _save(b / "1_cmyk.jpg", np.full((16, 16, 3), (200, 40, 10), np.uint8), mode="CMYK",
          quality=95)
    expected.append((1, (200, 40, 10)))
    png = _noise_image(b / "2_truncated.png", "PNG")
    (b / "2_truncated.png").write_bytes(png[: len(png) // 2])
    _save(b / "3_palette.gif", np.full((10, 10, 3), (0, 0, 255), np.uint8), mode="P")
    expected.append((1, (0, 0, 255)))
    corrupt = bytearray(_noise_image(b / "4_corrupt.png", "PNG"))
    idat = corrupt.index(b"IDAT") + 4
    corrupt[idat:idat + 200] = b"\x00" * 200  # header intact, compressed pixels destroyed
    (b / "4_corrupt.png").write_bytes(bytes(corrupt))
    _save(b / "5_tiny.png", np.full((2, 3, 3), 250, np.uint8))
    expected.append((1, (250, 250, 250)))
    _save(b / "6_scan.tif", np.full((8, 8, 3), (50, 60, 70), np.uint8))
    expected.append((1, (50, 60, 70)))
    (b / "7_empty.png").write_bytes(b"")
    return expected


def folder_images(folder, channels=3, size=8, **overrides):
    """`data.images` of an image folder: the decoded evaluation views, (image, label) pairs."""
    cfg = small_config().data
    cfg.update(dict(source="image_folder", data_dir=str(folder), channels=channels,
                    image_size=size, mean=(0.5,) * channels, std=(0.25,) * channels,
                    cache=False, **overrides))
    return cfg, data.images(cfg, cfg.train_split)


def test_bad_files_are_skipped_counted_and_named_and_every_format_is_converted(tmp_path, caplog):
    expected = make_messy_folder(tmp_path)
    folder = str(tmp_path)
    cfg, ds = folder_images(folder)
    # Files that are no image at all, empty or truncated are found when listing, before
    # anything is decoded.
    listed = image_folder.skipped_files(folder)
    assert sorted(os.path.basename(f) for f in listed) == [
        "2_truncated.png", "5_truncated.jpg", "6_page.jpg", "7_empty.png"]
    assert "not an image" in listed[str(tmp_path / "a" / "6_page.jpg")]
    assert listed[str(tmp_path / "b" / "7_empty.png")] == "empty file"
    assert "no JPEG end-of-image marker" in listed[str(tmp_path / "a" / "5_truncated.jpg")]
    assert "no PNG IEND" in listed[str(tmp_path / "b" / "2_truncated.png")]
    assert "Skipping 4 of 13 files in image folder" in caplog.text and "6_page.jpg" in caplog.text

    out = list(ds.as_numpy_iterator())
    # Corrupt pixel data behind a valid header and end is dropped when decoded, and named;
    # labels stay with their images.
    skipped = image_folder.skipped_files(folder)
    assert sorted(os.path.basename(f) for f in skipped) == [
        "2_truncated.png", "4_corrupt.png", "5_truncated.jpg", "6_page.jpg", "7_empty.png"]
    assert "4_corrupt.png: cannot decode the image" in caplog.text
    assert [int(y) for _, y in out] == [label for label, _ in expected]
    for (image, _), (_, colour) in zip(out, expected):
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
        # JPEG (and CMYK JPEG) are lossy; the lossless formats convert exactly.
        np.testing.assert_allclose(image.reshape(-1, 3).mean(0), colour, atol=6)

    _, gray = folder_images(folder, channels=1)
    gray = list(gray.as_numpy_iterator())
    np.testing.assert_array_equal(gray[1][0], 128)  # 16-bit scaled, not clipped at 255
    np.testing.assert_array_equal(gray[0][0], 90)

    # Training batches from this folder: finite, in [0, 1].
    batch = next(iter(data.train_dataset(cfg, batch_size=16, seed=0)))
    for view in (batch["view1"], batch["view2"]):
        assert np.isfinite(view).all() and 0 <= view.numpy().min() <= view.numpy().max() <= 1


def test_on_bad_image_error_names_the_file_at_listing_or_at_decoding(tmp_path):
    make_messy_folder(tmp_path)
    with pytest.raises(DataError,
                       match=r"4 of 13 files are not readable images: .*6_page.jpg.*"
                             r"data.on_bad_image=skip"):
        folder_images(tmp_path, on_bad_image="error")
    # Corrupt data behind a valid header and end: found when the pipeline decodes it.
    folder = tmp_path / "decoding"
    folder.mkdir()
    _save(folder / "good.png", np.zeros((8, 8, 3), np.uint8))
    png = bytearray(_noise_image(folder / "broken.png", "PNG"))
    idat = png.index(b"IDAT") + 4
    png[idat:idat + 200] = b"\x00" * 200
    (folder / "broken.png").write_bytes(bytes(png))
    _, ds = folder_images(folder, on_bad_image="error")
    config = small_config()
    with pytest.raises(DataError, match=r"broken.png: cannot decode the image \(.*Error"):
        with errors.explained_failures(config):  # what train_and_evaluate wraps fit in
            list(ds)


def test_empty_folders_and_single_image_folders(tmp_path):
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    (empty / "class_a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=f"{empty} contains no images.*1 other files"):
        folder_images(empty)
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match=f"{only_bad} contains no readable images.*x.png"):
        folder_images(only_bad)

    one = tmp_path / "one"
    one.mkdir()
    _save(one / "only.png", np.full((5, 7, 3), 66, np.uint8))  # also smaller than the crop
    cfg, ds = folder_images(one, size=16)
    ((image, label),) = list(ds.as_numpy_iterator())
    assert label == -1 and image.shape == (16, 16, 3) and (image == 66).all()
    views = next(iter(data.train_dataset(cfg, batch_size=2, seed=0)))
    assert views["view1"].shape == (2, 16, 16, 3)
    config = small_config(steps_per_epoch=None)
    config.data = cfg
    with pytest.raises(config_lib.ConfigError, match=r"'train.batch_size' \(32\) is larger than "
                                                     r"the training set \(1\)"):
        train_lib.steps_per_epoch(config)


# ----------------------------------------------------------------------------- train.py


def _config_file(tmp_path, name, body):
    """A config file whose get_config() runs `body`; a body starting with "#raw" is the whole
    file."""
    path = tmp_path / f"{name}.py"
    if body.startswith("#raw"):
        path.write_text(body)
    else:
        path.write_text("from configs import synthetic\nimport ml_collections\n\n\n"
                        "def get_config():\n" + textwrap.indent(textwrap.dedent(body), "    "))
    return str(path)


# (name, train.py arguments, the expected one-line message)
CONFIG_MISTAKES = [
    ("unknown_key_on_the_command_line", ["--config.train.batch_sze=8"],
     "Unknown config key 'train.batch_sze'. Did you mean 'train.batch_size'?"),
    ("unknown_key_in_a_config_file", "c = synthetic.get_config()\nc.moco.temprature = 0.1\nreturn c",
     "Unknown config key 'moco.temprature'. Did you mean 'moco.temperature'?"),
    ("wrong_type_on_the_command_line", ["--config.train.epochs=ten"],
     "--config.train.epochs=ten: invalid literal for int()"),
    ("wrong_type_in_a_config_file",
     "raw = synthetic.get_config().to_dict()\nraw['train']['epochs'] = 'ten'\n"
     "return ml_collections.ConfigDict(raw)",
     "'train.epochs' must be of type int, got 'ten'."),
    ("queue_not_a_multiple_of_the_batch", ["--config.moco.queue_size=100"],
     "'moco.queue_size' (100) must be a multiple of 'train.batch_size' (32)"),
    ("batch_larger_than_the_dataset",
     ["--config.train.batch_size=512", "--config.moco.queue_size=1024"],
     "'train.batch_size' (512) is larger than the training set (256 images of synthetic"),
    ("temperature_not_positive", ["--config.moco.temperature=0"],
     "'moco.temperature' must be > 0, got 0"),
    ("momentum_outside_0_1", ["--config.moco.momentum=1.5"],
     "'moco.momentum' must be >= 0 and <= 1, got 1.5."),
    ("missing_image_folder",
     ["--config.data.source=image_folder", "--config.data.data_dir=/nonexistent/images"],
     "'data.data_dir': the image folder '/nonexistent/images' does not exist."),
    ("missing_fashion_mnist_folder",
     ["--config=configs/fashion_mnist.py:smoke", "--config.data.data_dir=/nonexistent/fmnist"],
     "'data.data_dir': the Fashion-MNIST folder /nonexistent/fmnist does not exist."),
    ("config_file_does_not_exist", ["--config={tmp}/nosuch.py"],
     "the config file {tmp}/nosuch.py does not exist"),
    ("config_file_with_a_syntax_error", "def get_config(:\n",
     "has a syntax error at line"),
    ("unknown_config_variant", ["--config=configs/synthetic.py:nosuch"],
     "Unknown variant 'nosuch': configs/synthetic.py has none."),
    ("steps_per_epoch_negative", ["--config.train.steps_per_epoch=-1"],
     "'train.steps_per_epoch' must be >= 1, got -1."),
    ("epochs_zero", ["--config.train.epochs=0"], "'train.epochs' must be >= 1, got 0."),
    ("knn_ks_not_integers", ["--config.eval.knn_ks=(5.5,)"],
     "'eval.knn_ks' must be a tuple of int, e.g. (200, 20), got (5.5,)."),
    ("std_not_numbers", ["--config.data.std=(abc,)"], "'data.std' must be a tuple of float"),
    ("seed_negative", ["--config.seed=-1"], "'seed' must be >= 0 and <= 4294967295, got -1."),
    ("lr_decay_epochs_decreasing", ["--config.train.lr_decay_epochs=(2,1)"],
     "'train.lr_decay_epochs' must be increasing epochs > 0"),
    ("placeholder_of_the_wrong_type_in_a_config_file",
     "raw = synthetic.get_config().to_dict()\nraw['train']['steps_per_epoch'] = 'ten'\n"
     "return ml_collections.ConfigDict(raw)",
     "'train.steps_per_epoch' must be of type int or None, got 'ten'."),
    ("fashion_mnist_with_fewer_classes",
     ["--config=configs/fashion_mnist.py:smoke", "--config.data.num_classes=4"],
     "'data.num_classes' (4) is smaller than the 10 classes of Fashion-MNIST; set "
     "data.num_classes=10."),
    # Config files that do not load: one line naming the file and the error (were 18-51
    # traceback lines, or "Unknown config key '?'").
    ("get_config_raises", "return undefined_name",
     "get_config() in {tmp}/get_config_raises.py failed: NameError: name 'undefined_name' is "
     "not defined (line 6)."),
    ("config_file_import_fails", "#raw\nimport no_such_module_xyz\n\n\ndef get_config():\n"
                                 "    return None\n",
     "the config file {tmp}/config_file_import_fails.py failed to load: ModuleNotFoundError: "
     "No module named 'no_such_module_xyz' (line 2)."),
    ("get_config_returns_a_dict", "return {'seed': 1}",
     "get_config() in {tmp}/get_config_returns_a_dict.py returned a dict; it must return an "
     "ml_collections.ConfigDict"),
    ("config_file_without_get_config", "#raw\nSEED = 1\n",
     "the config file {tmp}/config_file_without_get_config.py has no get_config() function"),
    ("tpu_without_a_tpu", ["--config.train.strategy=tpu"],
     "'train.strategy' is 'tpu' but no TPU was found at 'local'"),
    ("mirrored_without_gpus", ["--config.train.strategy=mirrored"],
     "'train.strategy' is 'mirrored' but TensorFlow sees no GPU (and one CPU device)"),
    ("service_for_an_in_memory_source", ["--config.data.service_address=grpc://localhost:1"],
     "'data.service_address' works with data.source='image_folder'"),
    # Data errors: the data given cannot be used as it is (also exit 2, before anything is built).
    ("unprepared_tfds_imagenet",
     ["--config=configs/moco_v2.py", "--config.data.data_dir={tmp}/no_tfds"],
     "Data error: tfds dataset 'imagenet2012' is not prepared in {tmp}/no_tfds and tfds cannot "
     "download it: manual_dir should contain two files: ILSVRC2012_img_train.tar and "
     "ILSVRC2012_img_val.tar."),
    ("unprepared_tfds_without_download",
     ["--config.data.source=tfds", "--config.data.name=cifar10",
      "--config.data.data_dir={tmp}/no_tfds", "--config.data.tfds_download=False"],
     "Data error: tfds dataset 'cifar10' is not prepared in {tmp}/no_tfds. Run `python -m "
     "moco_tf.data.prepare cifar10 --data_dir={tmp}/no_tfds`"),
    ("flat_validation_folder",
     ["--config=configs/moco_v2.py", "--config.data.source=image_folder",
      "--config.data.data_dir={tmp}/ilsvrc/train", "--config.data.eval_dir={tmp}/ilsvrc/val_flat",
      "--config.train.batch_size=2", "--config.moco.queue_size=4"],
     "Data error: data.eval_dir ({tmp}/ilsvrc/val_flat) has no class sub-folders, but the kNN "
     "monitor needs labels."),
    ("fewer_classes_than_class_folders",
     ["--config=configs/moco_v2.py", "--config.data.source=image_folder",
      "--config.data.data_dir={tmp}/ilsvrc/train", "--config.data.eval_dir={tmp}/ilsvrc/train",
      "--config.data.num_classes=1", "--config.train.batch_size=2", "--config.moco.queue_size=4"],
     "Config error: 'data.num_classes' (1) is smaller than the 2 classes of {tmp}/ilsvrc/train; "
     "set data.num_classes=2."),
]

_HOLD_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("workdir", sys.argv[1])
workdir = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workdir)  # the module alone: no TensorFlow, starts in a blink
workdir.claim(sys.argv[2])
print("locked", flush=True)
time.sleep(600)
"""

# Runs train.py's own entry (absl app.run with its flag parser and main) once per case, each in
# a process forked from one that imported train.py and TensorFlow once: a fresh start of
# `python train.py` per case would import TensorFlow each time (~6 s each on 2 busy cores).
_RUN_CASES = """
import importlib.util, json, os, sys, traceback
sys.path.insert(0, os.getcwd())
from moco_tf import cli
from moco_tf import train_cli as train  # what train.py runs
import moco_tf.train_lib  # noqa: F401  TensorFlow and the package, imported once, no op run
from absl import app
children = {}
for name, args, stderr_path in json.loads(sys.argv[1]):  # all at once: most end in a blink
    pid = os.fork()
    if pid == 0:
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        sys.argv = train.bundled_config(["train.py", *args])  # as train.py's run() sets it
        code = 0
        try:
            app.run(train.main, flags_parser=cli.parse_flags)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    children[name] = pid
print(json.dumps({name: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                  for name, pid in children.items()}))
"""


@pytest.fixture(scope="module")
def train_py_runs(tmp_path_factory):
    """train.py's entry on each config mistake (forked, see `_RUN_CASES`), and a real
    `python train.py` on a workdir locked by a live process, run at the same time.
    Yields {name: (returncode, stderr, workdir)} and the lock holder's Popen ("holder")."""
    tmp = tmp_path_factory.mktemp("train_py")
    for folder in ("ilsvrc/train/n01", "ilsvrc/train/n02", "ilsvrc/val_flat"):
        os.makedirs(tmp / folder)
        _save(tmp / folder / "x.jpg", np.full((40, 50, 3), 90, np.uint8))
        _save(tmp / folder / "y.jpg", np.full((40, 50, 3), 20, np.uint8))
    cases = []
    for name, args, _ in CONFIG_MISTAKES:
        if isinstance(args, str):
            args = [f"--config={_config_file(tmp, name, args)}"]
        args = [a.replace("{tmp}", str(tmp)) for a in args]
        config = [] if any(a.startswith("--config=") for a in args) else [
            "--config=configs/synthetic.py"]
        workdir = str(tmp / name / "workdir")
        cases.append((name, config + args + [f"--workdir={workdir}"], str(tmp / f"{name}.err")))
    # A workdir with a checkpoint of another model (a queue of 128 keys, not 64).
    other = synthetic.get_config()
    other.moco.queue_size = 128
    model = train_lib.build_model(other)
    model.optimizer.build(model.trainable_variables)
    checkpoint_lib.Checkpointer(str(tmp / "other_model" / "checkpoints"), model, seed=0,
                                batch_size=32).save(8, 1)
    cases.append(("checkpoint_of_another_model", ["--config=configs/synthetic.py",
                                                  f"--workdir={tmp / 'other_model'}"],
                  str(tmp / "other_model.err")))
    # A queue of 2^40 keys (512 TB): TensorFlow's allocator really fails (after ~10 s of retries).
    cases.append(("out_of_memory", ["--config=configs/synthetic.py",
                                    f"--config.moco.queue_size={2**40}",
                                    f"--workdir={tmp / 'oom'}"], str(tmp / "oom.err")))
    locked = str(tmp / "locked_workdir")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, os.path.join(ROOT, "moco_tf", "workdir.py"), locked],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.Popen(
            [sys.executable, "train.py", "--config=configs/synthetic.py", f"--workdir={locked}"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        driver = subprocess.run([sys.executable, "-c", _RUN_CASES, json.dumps(cases)], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert driver.returncode == 0, driver.stderr[-3000:]
        codes = json.loads(driver.stdout.strip().splitlines()[-1])
        results = {name: (codes[name], open(err).read(), args[-1].split("=", 1)[1])
                   for name, args, err in cases}
        out, err = second.communicate(timeout=300)
        results["locked"] = (second.returncode, err, locked)
        results["holder"] = holder
        yield results
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("name,args,message", CONFIG_MISTAKES, ids=[c[0] for c in CONFIG_MISTAKES])
def test_train_py_refuses_a_config_mistake_with_one_line_and_exit_2(train_py_runs, name, args,
                                                                     message):
    returncode, stderr, workdir = train_py_runs[name]
    tmp = os.path.dirname(os.path.dirname(workdir))
    kind = "Data error:" if message.startswith("Data error:") else "Config error:"
    message = message.replace("{tmp}", tmp).removeprefix(kind).strip()
    lines = [line for line in stderr.splitlines() if line.startswith(kind)]
    assert returncode == 2, stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], lines
    assert "Traceback" not in stderr
    # tfds' "Variant folder D/imagenet2012/5.1.0 has no dataset_info.json" (D does not exist).
    assert "Variant folder" not in stderr, stderr
    assert not os.path.exists(workdir)  # stopped before anything was built or written


def test_a_second_run_on_a_locked_workdir_is_refused_and_a_dead_holder_is_taken_over(
        train_py_runs, caplog):
    returncode, stderr, workdir = train_py_runs["locked"]  # a real `python train.py`
    holder = train_py_runs["holder"]
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert returncode == 1, stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert f"The workdir {workdir} is in use by another training run (pid {holder.pid}" in errors[0]
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # it wrote nothing
    # kill -9: the holder cannot clean up; its lock file stays, naming it.
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with open(os.path.join(workdir, workdir_lib.LOCK_FILE)) as f:
        assert json.load(f)["pid"] == holder.pid
    with workdir_lib.WorkdirLock(workdir):
        assert f"Taking over the lock {workdir}/.lock of pid {holder.pid}" in caplog.text
    with workdir_lib.WorkdirLock(workdir):  # released cleanly: nothing to take over
        pass


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_says_how_to_resume_and_exits_143(tmp_path):
    # What preemption or `kill` does to a real `python train.py`: stop between steps like Ctrl-C.
    workdir = tmp_path / "run"
    run = subprocess.Popen(
        [sys.executable, "train.py", "--config=configs/synthetic.py", f"--workdir={workdir}",
         "--config.train.epochs=50", "--config.train.checkpoint_every_steps=0",
         "--config.eval.knn_every_epochs=0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = workdir / "steps.jsonl"
    try:
        for _ in range(1200):  # training has started once a step is logged
            if run.poll() is not None or (steps.exists() and steps.read_text().count("\n") >= 2):
                break
            time.sleep(0.1)
        assert run.poll() is None, run.communicate()[1][-2000:]
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"Interrupted: Interrupted at step (\d+) of 400; saved (\S+)\. Rerun the "
                         r"same command to resume from there\.", line)
    assert match, line
    step, path = int(match.group(1)), match.group(2)
    assert step >= 2 and path.endswith(f"ckpt-{step}")
    assert checkpoint_lib.checkpoints_in(str(workdir / "checkpoints"))[0] == path


# train.py itself, stalled at one point (a marker file says it got there) so that the test can
# send a signal there: in TensorFlow's import, or in the export after training.
_STALLED_TRAIN_PY = """
import importlib.abc, os, runpy, sys, time
marker, where = sys.argv.pop(1), sys.argv.pop(1)
sys.path.insert(0, os.getcwd())

def stall(*args, **kwargs):
    open(marker, "w").close()
    time.sleep(300)

if where == "tensorflow_import":
    class Stall(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow":
                stall()
            return None
    sys.meta_path.insert(0, Stall())
else:  # the export, after the last step's checkpoint
    from moco_tf import export
    export.export_backbone = stall
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""

_QUICK_RUN = ["--config=configs/synthetic.py", "--config.train.epochs=1",
              "--config.train.steps_per_epoch=2", "--config.eval.knn_every_epochs=0",
              "--config.train.verbose=0"]
_NOISE = re.compile(r"[IWE]0000 |WARNING: All log messages before absl::InitializeLog")


@pytest.mark.slow
@pytest.mark.parametrize("where,signum,line", [
    ("tensorflow_import", signal.SIGINT,
     r"Interrupted: Stopped before training began: nothing was trained or saved; checkpoints "
     r"already in \S+/checkpoints are kept\. Rerun the same command to start \(or resume\)\."),
    ("export", signal.SIGTERM,
     r"Interrupted: Interrupted after training, during the evaluation and export; all 2 steps "
     r"are saved \(\S+/ckpt-2\)\. Rerun the same command to evaluate and export \(nothing is "
     r"left to train\)\."),
])
def test_a_signal_outside_training_gives_one_line_and_the_signals_exit_status(tmp_path, where,
                                                                             signum, line):
    # Were a 22-line (import) and a 52-line (final evaluation) traceback, SIGTERM exit 130.
    marker = tmp_path / "stalled"
    run = subprocess.Popen(
        [sys.executable, "-c", _STALLED_TRAIN_PY, str(marker), where, *_QUICK_RUN,
         f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    try:
        for _ in range(3000):
            if marker.exists() or run.poll() is not None:
                break
            time.sleep(0.1)
        assert run.poll() is None, run.communicate()[1][-2000:]
        run.send_signal(signum)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr
    if where == "tensorflow_import":  # (the other harness imports TensorFlow itself)
        assert not _NOISE.search(stderr), stderr
    assert re.fullmatch(line, stderr.strip().splitlines()[-1]), stderr[-2000:]


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Three real `python train.py` runs of 2 steps, at once: absl's default verbosity, `-v 1`
    and `-v -1` (the space form). Yields {name: CompletedProcess-like (returncode, stderr)}."""
    tmp = tmp_path_factory.mktemp("quick")
    flags = {"default": [], "v1": ["-v", "1"], "v_minus_1": ["-v", "-1"]}
    runs = {name: subprocess.Popen([sys.executable, "train.py", *_QUICK_RUN, *extra,
                                    f"--workdir={tmp / name}"], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for name, extra in flags.items()}
    return {name: (run.wait(timeout=600), run.communicate()[1]) for name, run in runs.items()}


@pytest.mark.slow
def test_tensorflows_start_up_noise_is_hidden_and_shown_with_verbosity_1(quick_runs):
    returncode, stderr = quick_runs["default"]
    assert returncode == 0, stderr[-2000:]
    lines = stderr.splitlines()
    # The first line is ours: no oneDNN/CUDA notes, no "E0000 ... failed call to cuInit".
    assert re.match(r"I\d{4} .*train_lib.py:\d+\] Training 1 epochs x 2 steps of 32 images\.$",
                    lines[0]), lines[:5]
    assert not any(_NOISE.match(line) for line in lines), stderr
    returncode, stderr = quick_runs["v1"]
    assert returncode == 0, stderr[-2000:]
    assert any(_NOISE.match(line) for line in stderr.splitlines())  # all of it, with -v 1
    assert "Training 1 epochs x 2 steps" in stderr


@pytest.mark.slow
def test_verbosity_given_with_a_space_is_honoured(quick_runs):
    returncode, stderr = quick_runs["v_minus_1"]  # -v -1: warnings and errors only
    assert returncode == 0, stderr[-2000:]
    assert "Training 1 epochs" not in stderr and "Saved checkpoint" not in stderr


# The other command lines, each given a wrong input: (argv after `python -m`, the last line).
_OTHER_CLIS = {
    "linear_no_export": (
        ["moco_tf.eval.linear", "--export={tmp}/missing", "--config=configs/synthetic.py"],
        r"Error: load_backbone: no Keras backbone at \S+/missing\."),
    "linear_no_config_file": (  # was 30 lines of traceback
        ["moco_tf.eval.linear", "--export={tmp}/missing", "--config=configs/nope.py"],
        r"Config error: the config file configs/nope\.py does not exist .*"),
    "linear_bad_value": (
        ["moco_tf.eval.linear", "--export={tmp}/missing", "--config=configs/synthetic.py",
         "--config.data.image_size=0"],
        r"Config error: 'data\.image_size' must be >= 8, got 0\."),
    "linear_export_of_other_images": (  # was Keras' shape error after 40 lines
        ["moco_tf.eval.linear", "--export={tmp}/export28", "--config=configs/synthetic.py"],
        r"Config error: the export \S+ takes images of shape \[28, 28, 1\] but the config's "
        r"data gives \[16, 16, 1\]: .* --config\.data\.image_size=28\."),
    "to_torch": (["moco_tf.convert.to_torch", "--export={tmp}/missing", "--out={tmp}/o.pth"],
                 r"error: \S+/missing is not an export folder .*"),
    "torch_moco": (["moco_tf.convert.torch_moco", "--checkpoint={tmp}/missing.pth",
                    "--out={tmp}/out"], r"error: No checkpoint file at \S+/missing\.pth\."),
    "prepare": (["moco_tf.data.prepare", "no_such_dataset_xyz"],
                r"Data error: data\.name='no_such_dataset_xyz' is not a tfds dataset .*"),
    "prepare_without_manual_dir": (  # was led by tfds' "Variant folder ... has no dataset_info"
        ["moco_tf.data.prepare", "imagenet2012", "--data_dir={tmp}/no_tfds"],
        r"Data error: tfds dataset 'imagenet2012' is not prepared in \S+/no_tfds and tfds "
        r"cannot download it: .* Then run `python -m moco_tf\.data\.prepare imagenet2012 "
        r"--manual_dir=DIR --data_dir=\S+/no_tfds` with that folder\."),
    "imagenet_val": (["moco_tf.data.imagenet_val", "{tmp}"],
                     r"Error: \S+ has no ILSVRC2012_val_\*\.JPEG files to sort"),
}


@pytest.fixture(scope="module")
def other_cli_runs(tmp_path_factory):
    """Every `_OTHER_CLIS` case at once, and the first one again with TF_CPP_MIN_LOG_LEVEL=0.
    Yields {name: (returncode, stderr)}."""
    from moco_tf import export

    tmp = tmp_path_factory.mktemp("clis")
    inputs = keras.Input((28, 28, 1))
    export.export_backbone(keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs)),
                           str(tmp / "export28"), image_shape=(28, 28, 1))
    cases = {name: (argv, {}) for name, (argv, _) in _OTHER_CLIS.items()}
    cases["linear_tf_logs"] = (_OTHER_CLIS["linear_no_export"][0], {"TF_CPP_MIN_LOG_LEVEL": "0"})
    runs = {name: subprocess.Popen(
        [sys.executable, "-m", *[a.format(tmp=tmp) for a in argv]], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})
        for name, (argv, env) in cases.items()}
    return {name: (run.wait(timeout=600), run.communicate()[1]) for name, run in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_OTHER_CLIS))
def test_every_command_line_gives_one_line_without_tensorflows_start_up_noise(other_cli_runs,
                                                                              name):
    returncode, stderr = other_cli_runs[name]
    assert returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not any(_NOISE.match(line) for line in stderr.splitlines()), stderr
    assert "Variant folder" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert re.fullmatch(_OTHER_CLIS[name][1], stderr.strip().splitlines()[-1]), stderr[-2000:]


@pytest.mark.slow
def test_tf_cpp_min_log_level_0_shows_tensorflows_start_up_lines(other_cli_runs):
    returncode, stderr = other_cli_runs["linear_tf_logs"]
    assert returncode == 2, stderr[-2000:]
    assert any(_NOISE.match(line) for line in stderr.splitlines()), stderr


def test_startup_noise_is_dropped_but_real_errors_and_tracebacks_are_kept(capfd):
    from moco_tf import cli

    noise = ["WARNING: All log messages before absl::InitializeLog() is called are written to "
             "STDERR",
             "I0000 00:00:1796284220.955563   17905 port.cc:153] oneDNN custom operations are on.",
             "E0000 00:00:1796284222.039653   17905 cuda_platform.cc:52] failed call to cuInit: "
             "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)"]
    real = ["E0000 00:00:1796284222.039653   17905 some_op.cc:12] a real C++ error",
            "Traceback (most recent call last):", "ImportError: libcudnn.so.9: cannot open"]
    with pytest.raises(RuntimeError, match="still raised"):
        with cli.startup_noise_hidden():
            os.write(2, "\n".join(noise[:2] + real[:1] + noise[2:] + real[1:]).encode() + b"\n")
            raise RuntimeError("still raised")
    assert capfd.readouterr().err.splitlines() == real
    with cli.startup_noise_hidden(hide=False):
        os.write(2, (noise[1] + "\n").encode())
    assert capfd.readouterr().err.splitlines() == noise[1:2]


def test_a_check_that_fails_with_another_exception_is_still_one_line(tmp_path, monkeypatch,
                                                                    capsys):
    from absl import flags

    from moco_tf import cli, train_cli

    def broken(config):
        raise TypeError("'<' not supported between instances of 'str' and 'int'")

    absl_level = logging.getLogger("absl").level  # parsing --verbosity sets it
    cli.parse_flags(["train.py", "--config=configs/synthetic.py",
                     f"--workdir={tmp_path / 'run'}"])
    monkeypatch.setattr(config_lib, "validate", broken)
    try:
        with pytest.raises(SystemExit) as exit_:
            train_cli.main([])
    finally:
        flags.FLAGS.unparse_flags()
        logging.getLogger("absl").setLevel(absl_level)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "Config error: the config could not be checked (TypeError: '<' not supported between "
        "instances of 'str' and 'int'); look for a value of the wrong kind in the config file "
        "or the overrides."]
    assert not os.path.exists(tmp_path / "run")


def test_without_flock_the_lock_checks_the_pid(tmp_path, monkeypatch):
    """File systems without flock (some network mounts) are simulated by making flock fail
    with ENOLCK; the pids are real: this process (alive) and a finished child (dead)."""
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workdir_lib.fcntl, "flock", no_flock)
    alive = workdir_lib.WorkdirLock(str(tmp_path)).acquire()  # written by this process
    other_process = dict(workdir_lib._me(), pid=os.getppid(), started="earlier")
    (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps(other_process))
    with pytest.raises(workdir_lib.WorkdirError, match=f"in use .*pid {os.getppid()}"):
        workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / workdir_lib.LOCK_FILE).write_text(
        json.dumps(dict(other_process, pid=int(dead.stdout))))
    workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()  # stale: taken over
    alive.release()


# ----------------------------------------------------------------------------- workdir, disk


def test_unwritable_workdir_is_refused_before_anything_is_built(tmp_path):
    """A path under a regular file cannot be created, even by root; a read-only mount cannot be
    written, even by root (chmod would not stop root, a ro tmpfs does)."""
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(workdir_lib.WorkdirError,
                       match=r"Cannot create the workdir .*a_file/run: Not a directory"):
        train_lib.train_and_evaluate(small_config(), str(tmp_path / "a_file" / "run"))
    with tmpfs(tmp_path / "ro", options="ro") as readonly:
        with pytest.raises(workdir_lib.WorkdirError,
                           match=f"The workdir {readonly} is not writable \\(Read-only file system"):
            train_lib.train_and_evaluate(small_config(), readonly)


def test_full_disk_at_save_is_a_clear_error_and_the_previous_checkpoint_stays_intact(tmp_path):
    """A real 2 MB tmpfs, filled with a file after the first checkpoint."""
    config = small_config()
    with tmpfs(tmp_path / "disk", size="2m") as disk:
        directory = os.path.join(disk, "checkpoints")
        model = train_lib.build_model(config, 10, 5)
        model.train_on_batch(_views(np.random.default_rng(0)))  # optimizer slots exist
        saver = checkpoint_lib.Checkpointer(directory, model, seed=0, batch_size=32)
        first = saver.save(1, epoch=0)
        filler = os.path.join(disk, "filler")
        with open(filler, "wb") as f:
            f.write(b"\0" * (workdir_lib.free_bytes(disk) - 16 * 1024))
        with pytest.raises(checkpoint_lib.CheckpointError,
                           match=r"Could not write checkpoint ckpt-2 .*No space left on device.*"
                                 rf"The previous checkpoint {first} is intact"):
            saver.save(2, epoch=0)
        assert checkpoint_lib.checkpoints_in(directory) == [first]  # no partial ckpt-2 left
        assert not any("ckpt-2" in name for name in os.listdir(directory))
        assert checkpoint_lib.verify(first) is None
        with open(os.path.join(disk, "rest"), "wb") as f, contextlib.suppress(OSError):
            f.write(b"\0" * 2**21)  # fills the last bytes, then fails: the disk is full
        # The same full disk at the start of a run: refused before any model is built.
        with pytest.raises(workdir_lib.WorkdirError, match="not writable \\(No space left"):
            workdir_lib.check_writable(os.path.join(disk, "next_run"))
        # TensorFlow reports a full disk as ResourceExhausted, like an OOM: told apart.
        with pytest.raises(workdir_lib.WorkdirError, match="No space left on device"):
            with errors.explained_failures(config):
                tf.io.write_file(os.path.join(disk, "big"), b"\0" * 2**20)
        os.remove(filler)
        os.remove(os.path.join(disk, "rest"))
        fresh = train_lib.build_model(config, 10, 5)
        restorer = checkpoint_lib.Checkpointer(directory, fresh, seed=0, batch_size=32)
        assert restorer.restore_latest() == 1  # nothing lost: resumes from the intact one
        assert restorer.save(2, epoch=0).endswith("ckpt-2")


# ----------------------------------------------------------------------------- NaN, OOM


def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """A learning rate of 1e15 per 256 images diverges in the first steps, as a bad lr does."""
    config = small_config(base_learning_rate=1e15, epochs=1, steps_per_epoch=4,
                          checkpoint_every_steps=1)
    workdir = str(tmp_path)
    with pytest.raises(callbacks_lib.NonFiniteError) as error:
        train_lib.train_and_evaluate(config, workdir)
    message = str(error.value)
    step = int(re.search(r"at step (\d+);", message).group(1))
    logged = callbacks_lib.read_step_log(os.path.join(workdir, "steps.jsonl"))
    bad = logged[step]["loss"]  # null once StepLog writes strict JSON, NaN before
    assert (bad is None or not np.isfinite(bad)) and np.isfinite(logged[step - 1]["loss"])
    directory = os.path.join(workdir, "checkpoints")
    assert checkpoint_lib.checkpoints_in(directory) == [os.path.join(directory, f"ckpt-{step - 1}")]
    assert f"Last good checkpoint: {directory}/ckpt-{step - 1}." in message
    assert "train.base_learning_rate" in message and "train.on_nan=skip_step" in message
    reader = tf.train.load_checkpoint(os.path.join(directory, f"ckpt-{step - 1}"))
    for name, dtype in reader.get_variable_to_dtype_map().items():
        if dtype.is_floating:
            assert np.isfinite(reader.get_tensor(name)).all(), name
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    workdir_lib.WorkdirLock(workdir).acquire().release()  # the failed run released its lock


def _views(rng, nan=False):
    x = rng.random((32, 16, 16, 1)).astype(np.float32)
    if nan:
        x[3, 5, 5, 0] = np.nan  # one bad pixel
    return {"view1": x, "view2": rng.random((32, 16, 16, 1)).astype(np.float32)}


def _state(model):
    return [v.numpy().copy() for v in model.variables + model.optimizer.variables]


def test_skip_step_leaves_every_variable_unchanged_on_a_nan_batch(tmp_path):
    rng = np.random.default_rng(0)
    good1, bad, good2 = _views(rng), _views(rng, nan=True), _views(rng)
    config = small_config(on_nan="skip_step")
    model = train_lib.build_model(config, 100, 10)
    guard = callbacks_lib.NonFiniteGuard("skip_step")
    guard.set_model(model)
    assert model.train_on_batch(good1, return_dict=True)["finite"] == 1.0
    before = _state(model)
    logs = model.train_on_batch(bad, return_dict=True)
    after = _state(model)
    assert logs["finite"] == 0.0
    guard.on_train_batch_end(0, logs)  # what fit calls after the step
    assert guard.skipped_steps == [2]
    changed = [v.path for v, x, y in zip(model.variables + model.optimizer.variables, before, after)
               if not np.array_equal(x, y)]
    assert changed == ["sgd/iteration"]  # weights, BN statistics, slots, key encoder, queue kept
    model.train_on_batch(good2, return_dict=True)
    assert all(np.isfinite(x).all() for x in _state(model))
    assert not all(np.array_equal(x, y) for x, y in zip(after, _state(model)))  # training goes on

    # Without skip_step the same batch puts NaN in the weights: no checkpoint takes them.
    plain = train_lib.build_model(small_config(), 100, 10)
    assert plain.train_on_batch(bad, return_dict=True)["finite"] == 0.0
    saver = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"), plain, seed=0, batch_size=32)
    periodic = callbacks_lib.PeriodicCheckpoint(saver, every_n_steps=1, steps_per_epoch=10)
    periodic.set_model(plain)
    with pytest.raises(callbacks_lib.NonFiniteError, match="variables are not finite"):
        periodic.on_epoch_end(0)
    assert checkpoint_lib.checkpoints_in(str(tmp_path / "ckpt")) == []


def test_a_float16_step_the_loss_scaler_skips_still_counts_as_a_batch():
    import keras

    config = small_config()
    config.precision = "mixed_float16"
    try:
        model = train_lib.build_model(config, 100, 10)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(0)
    model.train_on_batch(_views(rng))
    scaler = model.optimizer
    assert isinstance(scaler, keras.optimizers.LossScaleOptimizer)
    scaler.dynamic_scale.assign(2.0**127)  # the scaled loss overflows: the scaler skips this update
    weights = [w.numpy().copy() for w in model.backbone.trainable_weights]
    model.train_on_batch(_views(rng))
    assert float(scaler.dynamic_scale.numpy()) == 2.0**126  # skipped and halved...
    assert all(np.array_equal(w, v.numpy()) for w, v in zip(weights, model.backbone.trainable_weights))
    # ...yet the step counter (data position on resume, schedules' clock) counts the batch.
    assert int(model.optimizer.iterations.numpy()) == 2
    scaler.dynamic_scale.assign(1024.0)
    model.train_on_batch(_views(rng))
    assert int(model.optimizer.iterations.numpy()) == 3
    assert not all(np.array_equal(w, v.numpy()) for w, v in zip(weights, model.backbone.trainable_weights))


def test_a_checkpoint_of_another_model_is_an_input_mistake_exit_2(train_py_runs):
    returncode, stderr, workdir = train_py_runs["checkpoint_of_another_model"]
    lines = [line for line in stderr.splitlines() if "ckpt-8" in line]
    assert returncode == 2, stderr[-2000:]  # was 1, like a failure after the start
    assert len(lines) == 1 and "Traceback" not in stderr
    assert lines[0].startswith(f"Checkpoint error: {workdir}/checkpoints/ckpt-8 does not match "
                               f"this model (Received incompatible tensor with shape (128, 128)")
    assert lines[0].endswith("Use another --workdir.")


def test_out_of_memory_names_the_knobs_to_turn(train_py_runs):
    returncode, stderr, _ = train_py_runs["out_of_memory"]
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert returncode == 1, stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert errors[0].startswith(
        "Error: Out of memory (OOM when allocating tensor with shape[1099511627776,")
    for knob in ("train.batch_size (now 32", "data.image_size (now 16)",
                 "moco.queue_size (now 1099511627776)", "precision=mixed_bfloat16"):
        assert knob in errors[0]

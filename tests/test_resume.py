"""Checkpoints: an exact resume after SIGKILL, and a fallback over a damaged latest checkpoint."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from configs import synthetic
from moco_tf import callbacks as callbacks_lib
from moco_tf import checkpoint as checkpoint_lib
from moco_tf import errors, train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 3 epochs x 7 steps; checkpoints at steps 4, 7 (epoch end), 8, 12, 14, 16, 20, 21: a kill after
# step 8 resumes in the middle of epoch 2, the case that needs the data position.
CONFIG_FILE = '''
from configs import synthetic


def get_config():
    c = synthetic.get_config()
    c.deterministic = True
    c.data.synthetic_examples = 64
    c.data.shuffle_buffer = 64
    c.train.batch_size = 16
    c.train.epochs = 3
    c.train.steps_per_epoch = 7
    c.train.checkpoint_every_steps = 4
    c.train.keep_checkpoints = 3
    c.train.verbose = 0
    c.eval.knn_every_epochs = 0
    c.eval.export = False
    return c
'''
TOTAL_STEPS = 21
KILL_AFTER_CHECKPOINT = 8

# The killed run: train.py itself, with each step slowed down so that the test can kill it
# between checkpoints (a 16 px step takes milliseconds).
SLOW_TRAIN_PY = f'''
import runpy, sys, time
sys.path.insert(0, {ROOT!r})
from moco_tf import callbacks
_log_step = callbacks.StepLog.on_train_batch_end
def slow_step(self, batch, logs=None):
    _log_step(self, batch, logs)
    time.sleep(0.4)
callbacks.StepLog.on_train_batch_end = slow_step
sys.argv[0] = {os.path.join(ROOT, "train.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def train_command(config_path, workdir):
    return [sys.executable, "train.py", f"--config={config_path}", f"--workdir={workdir}"]


def final_state(workdir):
    """{name: value} of every variable in the newest checkpoint of a run."""
    reader = tf.train.load_checkpoint(os.path.join(workdir, train_lib.CHECKPOINT_DIR))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "OBJECT_GRAPH" not in name}


@pytest.mark.slow
def test_killed_run_resumes_exactly_like_an_uninterrupted_one(tmp_path):
    config_path = tmp_path / "tiny.py"
    config_path.write_text(CONFIG_FILE)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    # The uninterrupted run and the run to be killed, side by side.
    # Logs go to files: a full pipe would block a process.
    ref_log, victim_log = open(tmp_path / "straight.log", "w"), open(tmp_path / "killed.log", "w")
    reference = subprocess.Popen(train_command(config_path, straight), cwd=ROOT, env=env,
                                 stdout=ref_log, stderr=subprocess.STDOUT)
    victim = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN_PY, f"--config={config_path}", f"--workdir={killed}"],
        cwd=ROOT, env=env, stdout=victim_log, stderr=subprocess.STDOUT,
    )
    state_file = killed / train_lib.CHECKPOINT_DIR / "checkpoint"
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if state_file.exists() and f'"ckpt-{KILL_AFTER_CHECKPOINT}"' in state_file.read_text():
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed:\n" + \
        (tmp_path / "killed.log").read_text()[-3000:]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    killed_at = max(callbacks_lib.read_step_log(str(killed / train_lib.STEP_LOG)))
    assert KILL_AFTER_CHECKPOINT <= killed_at < TOTAL_STEPS

    # The same command again, on the same workdir: it resumes by itself.
    resumed = subprocess.run(train_command(config_path, killed), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    match = re.search(r"Resuming from step (\d+)", resumed.stderr)
    assert match, resumed.stderr[-3000:]
    resume_step = int(match.group(1))
    assert KILL_AFTER_CHECKPOINT <= resume_step <= killed_at and resume_step % 7  # mid-epoch

    reference.wait(timeout=300)
    ref_log.close()
    victim_log.close()
    assert reference.returncode == 0, (tmp_path / "straight.log").read_text()[-3000:]

    # Per-step losses: every step of the resumed run (before and after the resume) as uninterrupted.
    expected = callbacks_lib.read_step_log(str(straight / train_lib.STEP_LOG))
    got = callbacks_lib.read_step_log(str(killed / train_lib.STEP_LOG))
    assert sorted(expected) == sorted(got) == list(range(1, TOTAL_STEPS + 1))
    for step in range(1, TOTAL_STEPS + 1):
        for key in ("loss", "lr", "momentum"):
            assert got[step][key] == pytest.approx(expected[step][key], abs=1e-6), (step, key)
    assert len({round(expected[s]["loss"], 4) for s in expected}) > 10  # losses really vary

    # Final state: queue, pointer, key and query encoders, optimizer slots — all of it.
    a, b = final_state(straight), final_state(killed)
    assert sorted(a) == sorted(b)
    names = " ".join(a)
    for part in ("negatives/queue/", "queue_ptr", "key_encoder/backbone", "backbone", "optimizer"):
        assert part in names, part
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-6, rtol=0, err_msg=name)
    results = json.loads((killed / "results.json").read_text())
    assert results["resumed_from_step"] == resume_step
    assert len(results["loss_per_epoch"]) == 3 and None not in results["loss_per_epoch"]
    # Only the last keep_checkpoints remain.
    left = checkpoint_lib.checkpoints_in(str(killed / train_lib.CHECKPOINT_DIR))
    left = [os.path.basename(p) for p in left]
    assert left == ["ckpt-21", "ckpt-20", "ckpt-16"]


def tiny_model():
    c = synthetic.get_config()
    c.moco.queue_size = 32
    c.train.batch_size = 16
    return train_lib.build_model(c)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    directory = str(tmp_path / "ckpts")
    model = tiny_model()
    saver = checkpoint_lib.Checkpointer(directory, model, max_to_keep=3, seed=0, batch_size=16)
    model.optimizer.build(model.trainable_variables)
    for step in (4, 8, 12):
        model.queue.assign(tf.fill(model.queue.shape, float(step)))
        model.optimizer.iterations.assign(step)
        saver.save(step, epoch=0)
    # ckpt-12: the data file cut in half (a truncated copy); ckpt-8: one flipped byte.
    data_12 = tf.io.gfile.glob(os.path.join(directory, "ckpt-12.data-*"))[0]
    with open(data_12, "r+b") as f:
        f.truncate(os.path.getsize(data_12) // 2)
    data_8 = tf.io.gfile.glob(os.path.join(directory, "ckpt-8.data-*"))[0]
    with open(data_8, "r+b") as f:
        f.seek(os.path.getsize(data_8) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert checkpoint_lib.verify(os.path.join(directory, "ckpt-4")) is None
    assert checkpoint_lib.verify(os.path.join(directory, "ckpt-12")) is not None
    assert checkpoint_lib.verify(os.path.join(directory, "ckpt-8")) is not None

    fresh = tiny_model()
    restorer = checkpoint_lib.Checkpointer(directory, fresh, max_to_keep=3, seed=0, batch_size=16)
    with caplog.at_level(logging.WARNING):
        step = restorer.restore_latest()
    assert step == 4
    assert int(fresh.optimizer.iterations.numpy()) == 4
    np.testing.assert_array_equal(fresh.queue.numpy(), np.full(fresh.queue.shape, 4.0))
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "ckpt-12 is damaged" in warnings and "ckpt-8 is damaged" in warnings

    # A checkpoint of another run (other batch size) is refused with a clear error.
    other = checkpoint_lib.Checkpointer(directory, tiny_model(), seed=0, batch_size=32)
    with pytest.raises(checkpoint_lib.CheckpointError, match="batch_size=16.*batch_size=32"):
        other.restore_latest()
    # No readable checkpoint at all: an error, not a silent fresh start.
    os.remove(os.path.join(directory, "ckpt-4.index"))
    with pytest.raises(checkpoint_lib.CheckpointError, match="No readable checkpoint"):
        checkpoint_lib.Checkpointer(directory, tiny_model(), seed=0, batch_size=16).restore_latest()


def test_skipping_batches_gives_the_batches_of_an_uninterrupted_pipeline():
    from moco_tf import data

    c = synthetic.get_config()
    c.data.synthetic_examples = 40  # 2.5 batches per pass: batches straddle the reshuffles
    c.data.shuffle_buffer = 16  # smaller than the data, as for large datasets
    tf.random.set_seed(0)
    straight = list(data.train_dataset(c.data, 16, seed=3).take(12).as_numpy_iterator())
    for start in (1, 5, 7):
        tf.random.set_seed(0)
        skipped = list(data.train_dataset(c.data, 16, seed=3, start_batch=start)
                       .take(12 - start).as_numpy_iterator())
        for i, batch in enumerate(skipped):
            np.testing.assert_array_equal(batch["view1"], straight[start + i]["view1"])
            np.testing.assert_array_equal(batch["view2"], straight[start + i]["view2"])


def finished_tiny_run(workdir):
    c = synthetic.get_config()
    c.data.synthetic_examples = 64
    c.moco.queue_size = 32
    c.train.batch_size = 16
    c.train.steps_per_epoch = 3
    c.train.verbose = 0
    c.eval.knn_ks = (5,)
    c.eval.batch_size = 32
    return c, train_lib.train_and_evaluate(c, workdir)[1]


def test_rerunning_a_finished_run_reports_it_without_training(tmp_path):
    workdir = str(tmp_path)
    c, first = finished_tiny_run(workdir)
    _, again = train_lib.train_and_evaluate(c, workdir)
    assert first["resumed_from_step"] == 0 and again["resumed_from_step"] == 6
    assert again["loss_per_epoch"] == first["loss_per_epoch"]  # from the step log, not re-run
    assert again["knn_per_epoch"] == first["knn_per_epoch"]  # from knn.jsonl
    assert again["knn_top1"] == first["knn_top1"]
    projector_dir = os.path.join(workdir, "tensorboard", "projector")
    assert first["projector_examples"] == 16  # the synthetic test split
    assert os.path.isfile(os.path.join(projector_dir, "projector_config.pbtxt"))


def test_a_resumed_run_keeps_the_knn_curve_of_the_epochs_before_the_resume(tmp_path):
    workdir = str(tmp_path)
    c, first = finished_tiny_run(workdir)
    assert [e["epoch"] for e in first["knn_per_epoch"]] == [1, 2]
    # As if killed during epoch 2 after its kNN: only the epoch-1 checkpoint is left.
    ckpt_dir = os.path.join(workdir, train_lib.CHECKPOINT_DIR)
    for name in os.listdir(ckpt_dir):
        if name.startswith("ckpt-6") or name == "checkpoint":
            os.remove(os.path.join(ckpt_dir, name))
    with open(os.path.join(workdir, "knn.jsonl"), "a") as f:
        f.write('{"epoch": 3, "k5"')  # a line torn by the kill
    _, resumed = train_lib.train_and_evaluate(c, workdir)
    assert resumed["resumed_from_step"] == 3
    # Epoch 1 from the log, epoch 2 evaluated again on identical weights: the same curve, once.
    assert resumed["knn_per_epoch"] == first["knn_per_epoch"]
    with open(os.path.join(workdir, "knn.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]


def test_rerunning_a_finished_run_keeps_its_throughput_figures(tmp_path):
    # Was: images_per_sec overwritten with null by the rerun, which trains nothing.
    workdir = str(tmp_path)
    c, first = finished_tiny_run(workdir)
    _, again = train_lib.train_and_evaluate(c, workdir)
    assert first["images_per_sec"] is not None and first["images_per_sec"] > 0
    assert (again["images_per_sec"], again["train_seconds"]) == (first["images_per_sec"],
                                                                 first["train_seconds"])


class _Clock:
    """A clock the test moves by hand: what `_Throughput` reads instead of the time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fit(throughput, clock, epochs, steps, first_step_seconds, step_seconds, eval_seconds=50.0):
    """The callbacks `fit` calls, with a slow first step (tracing) and an evaluation after each
    epoch (which must not count)."""
    throughput.on_train_begin()
    for epoch in range(epochs):
        throughput.on_epoch_begin(epoch)
        for batch in range(steps):
            clock.now += first_step_seconds if (epoch == 0 and batch == 0) else step_seconds
            throughput.on_train_batch_end(batch)
        throughput.on_epoch_end(epoch)
        clock.now += eval_seconds


def test_throughput_after_a_resume_leaves_out_each_fits_first_step():
    # A resume at step 9 of 3 x 8: one fit of the rest of epoch 2 (7 steps), one of epoch 3.
    # Each fit's first step traces the step function (20 s here); the steady step is 0.01 s.
    clock = _Clock()
    throughput = train_lib._Throughput(batch_size=32, clock=clock)
    _fit(throughput, clock, epochs=1, steps=7, first_step_seconds=20.0, step_seconds=0.01)
    _fit(throughput, clock, epochs=1, steps=8, first_step_seconds=20.0, step_seconds=0.01)
    assert throughput.timed_steps == 6 + 7
    assert throughput.images_per_sec() == pytest.approx(32 / 0.01)  # not (15 * 32) / 40.15 s
    assert throughput.train_seconds == pytest.approx(40.0 + 13 * 0.01)
    # A one-epoch run: its tracing step is left out too (was: counted, the only epoch).
    single = train_lib._Throughput(batch_size=32, clock=clock)
    _fit(single, clock, epochs=1, steps=5, first_step_seconds=20.0, step_seconds=0.5)
    assert single.images_per_sec() == pytest.approx(32 / 0.5)
    nothing = train_lib._Throughput(batch_size=32, clock=clock)
    _fit(nothing, clock, epochs=1, steps=1, first_step_seconds=20.0, step_seconds=0.5)
    assert nothing.images_per_sec() is None  # no steady step to time


def test_a_mid_epoch_resume_numbers_epochs_and_steps_as_the_run_does(tmp_path, capsys, caplog):
    import keras

    class CtrlC(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 9:
                raise KeyboardInterrupt

    c = synthetic.get_config()
    c.data.synthetic_examples, c.moco.queue_size, c.train.batch_size = 64, 32, 16
    c.train.epochs, c.train.steps_per_epoch, c.train.checkpoint_every_steps = 3, 8, 0
    c.eval.knn_ks, c.eval.batch_size, c.eval.export, c.train.verbose = (5,), 32, False, 0
    with pytest.raises(errors.Interrupted, match="Interrupted at step 9 of 24"):
        train_lib.train_and_evaluate(c, str(tmp_path), callbacks=[CtrlC()])
    capsys.readouterr()
    c.train.verbose = 1
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
        _, results = train_lib.train_and_evaluate(c, str(tmp_path))
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # the bar's colours
    # The first fit is the rest of epoch 2: "Epoch 2/3", steps 2..8 of 8 (was "Epoch 2/2", 1/7).
    assert re.findall(r"Epoch (\d/\d)\n", out) == ["2/3", "3/3"]
    counts = re.findall(r"(\d+)/(\d+) ", out)
    assert counts and {total for _, total in counts} == {"8"}
    assert counts[0][0] == "2"
    # The kNN line starts on a line of its own, not at the end of the bar's.
    assert re.findall(r"(?m)^Epoch (\d): kNN top-1 k=5: ", out) == ["2", "3"]
    assert not re.search(r"[^\n]Epoch \d: kNN", out)
    # The resume line and the checkpoint lines say where a step is the same way.
    text = caplog.text
    assert "Resuming from step 9 of 24 (epoch 2 of 3, step 1 of 8 done)" in text
    assert "ckpt-16 (step 16 of 24: epoch 2 of 3, step 8 of 8)." in text
    assert results["resumed_from_step"] == 9 and results["images_per_sec"] > 0

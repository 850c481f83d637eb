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
from moco_tf import train_lib

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

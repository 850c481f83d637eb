"""Many devices: strategies, the queue and shuffle-BN across replicas, multi-worker, bf16 and XLA.

Runs on several replicas need devices configured before TensorFlow starts, so they run in fresh
processes (tests/distribute_worker.py): 2 logical CPU devices under MirroredStrategy, and two
worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy.
"""

import json
import os
import socket
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from moco_tf import config as config_lib
from moco_tf import distribute, train_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distribute_worker as worker  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distribute_worker.py")
G, STEPS = worker.GLOBAL_BATCH, worker.STEPS


def _run(args, env=None, timeout=400):
    proc = subprocess.run([sys.executable, WORKER, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


# --- one device ---------------------------------------------------------------------------------


def test_create_strategy_default_and_unknown():
    assert distribute.create_strategy("default").num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="strategy must be one of"):
        distribute.create_strategy("horovod")
    c = worker.small_config("bn")
    c.train.strategy = "gpus"
    with pytest.raises(config_lib.ConfigError, match="train.strategy"):
        config_lib.validate(c)


def test_check_config_needs_batch_divisible_by_replicas():
    three = types.SimpleNamespace(num_replicas_in_sync=3)
    c = worker.small_config("bn")
    with pytest.raises(config_lib.ConfigError, match=r"divisible by the 3 replicas.*try 15"):
        distribute.check_config(c, three)
    two = types.SimpleNamespace(num_replicas_in_sync=2)
    c.model.norm, c.model.split_bn_groups = "split_bn", 16  # divides 16, not the 8 per replica
    with pytest.raises(config_lib.ConfigError, match=r"batch per replica \(16 / 2 = 8\)"):
        distribute.check_config(c, two)
    c.model.split_bn_groups = 4
    assert distribute.check_config(c, two) == 8
    c.train.jit_compile = True
    with pytest.raises(config_lib.ConfigError, match="keras#19005"):
        distribute.check_config(c, two)


def test_one_replica_shuffle_is_the_batch_shuffle():
    x = tf.reshape(tf.range(12.0), (6, 2))
    seed = tf.constant([3, 7], tf.int64)
    shuffled, unshuffle = distribute.shuffle_across_replicas(x, seed)
    expected, inverse = distribute.batch_shuffle(x, seed)
    np.testing.assert_array_equal(shuffled.numpy(), expected.numpy())
    assert not np.array_equal(shuffled.numpy(), x.numpy())
    np.testing.assert_array_equal(unshuffle(shuffled).numpy(), x.numpy())
    logs = {"loss": tf.constant(1.0)}
    assert distribute.step_logs(logs) is logs  # reshaped only across several workers


def _losses(precision="float32", jit_compile=False, weights=None):
    c = worker.small_config("bn")  # plain BN: its output does not depend on the key permutation
    c.precision, c.train.jit_compile = precision, jit_compile
    model = train_lib.build_model(c)
    initial = model.get_weights()
    if weights is not None:
        model.set_weights(weights)
    assert model.queue.dtype == "float32"  # the queue stays float32 whatever the precision
    _, ds = worker.fixed_batches()
    losses = worker.fit_steps(model, ds)
    keras.mixed_precision.set_global_policy("float32")
    return np.array(losses), initial, model


def test_precision_auto_takes_bfloat16_only_where_the_hardware_computes_it(caplog):
    # This test machine has no TPU or GPU: the CPU's flags decide.
    assert distribute.resolve_precision("auto", cpu_flags={"avx2", "fma"}) == "float32"
    for flag in ("avx512_bf16", "amx_bf16", "bf16"):  # x86 AVX512-BF16, AMX; Arm BF16
        assert distribute.resolve_precision("auto", cpu_flags={"avx2", flag}) == "mixed_bfloat16"
    # Explicit choices are kept; emulated bfloat16 (several times slower) is warned about.
    assert distribute.resolve_precision("float32", cpu_flags={"amx_bf16"}) == "float32"
    assert distribute.resolve_precision("mixed_float16", cpu_flags=set()) == "mixed_float16"
    caplog.clear()
    assert distribute.resolve_precision("mixed_bfloat16", cpu_flags={"avx2"}) == "mixed_bfloat16"
    assert "emulates" in caplog.text
    caplog.clear()
    distribute.resolve_precision("mixed_bfloat16", cpu_flags={"amx_bf16"})
    assert "emulates" not in caplog.text
    # build_model applies what "auto" resolves to on this machine.
    c = worker.small_config("bn")
    c.precision = "auto"
    config_lib.validate(c)
    model = train_lib.build_model(c)
    expected = distribute.resolve_precision("auto")
    assert keras.mixed_precision.global_policy().name == expected
    assert model.backbone.dtype_policy.name == expected
    keras.mixed_precision.set_global_policy("float32")


def test_bfloat16_float16_and_xla_steps_are_close_to_float32():
    ref, weights, _ = _losses()
    bf16, _, _ = _losses("mixed_bfloat16", weights=weights)
    fp16, _, model = _losses("mixed_float16", weights=weights)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # fp16 loss scaling
    xla, _, model = _losses(jit_compile=True, weights=weights)
    assert model.jit_compile is True
    for losses in (bf16, fp16, xla):
        assert np.all(np.isfinite(losses))
    assert not np.allclose(ref[0], ref[1:])  # the steps train: the losses move
    np.testing.assert_allclose(bf16, ref, atol=0.05)  # bf16: 8 bits of mantissa
    np.testing.assert_allclose(fp16, ref, atol=0.01)
    np.testing.assert_allclose(xla, ref, atol=1e-3)


# --- two replicas (2 logical CPU devices, MirroredStrategy) ------------------------------------


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("replicas") / "out.npz")
    _run(["replicas", path])
    return dict(np.load(path))


def _global_index(images, batch):
    """For each image of `images` [n, ...], its row in the global batch `batch` [G, ...]."""
    flat = batch.reshape(len(batch), -1)
    return np.array([int(np.flatnonzero((flat == im.reshape(-1)).all(1))[0]) for im in images])


def _seen_indices(r):
    """[STEPS, replicas, per-replica batch]: which images of each global batch every replica's
    key encoder saw (and so normalised together in one BN batch), in the order it saw them."""
    view2 = r["probe_view2"].reshape(STEPS, G, *r["probe_view2"].shape[1:])
    return np.array([[_global_index(seen, view2[s]) for seen in r["probe_seen"][s]]
                     for s in range(STEPS)])


def test_shuffle_bn_permutes_the_global_batch_across_replicas(two_replicas):
    seen = _seen_indices(two_replicas)
    replicas, n = seen.shape[1], seen.shape[2]
    own = [set(range(i * n, (i + 1) * n)) for i in range(replicas)]  # replica i's queries
    for s in range(STEPS):
        # One global permutation shared by the replicas: every image once, on one replica.
        assert sorted(seen[s].ravel()) == list(range(G))
        # ... the one the seed and the step define (view 2: seed * 2 + 0).
        expected = distribute._permutation(G, tf.constant([0, s], tf.int64)).numpy()
        np.testing.assert_array_equal(seen[s].ravel(), expected)
        # Each replica's key BN batch mixes images of every replica.
        for i in range(replicas):
            assert all(set(seen[s, i]) & own[j] for j in range(replicas))
    assert not np.array_equal(seen[0], seen[1])  # a new permutation every step


def test_queue_is_identical_on_replicas_and_holds_the_global_keys(two_replicas):
    r = two_replicas
    queues, ptrs = r["split_queue_replicas"], r["split_ptr_replicas"]
    np.testing.assert_array_equal(queues[0], queues[1])
    assert list(ptrs) == [STEPS * G] * 2
    # Keys recomputed on one device from the images each replica's key encoder saw, put back in
    # global-batch order: the queue holds the keys of every image of each global batch.
    seen = _seen_indices(r)
    for s in range(STEPS):
        expected = np.zeros((G, r["probe_keys"].shape[-1]), np.float32)
        for i in range(seen.shape[1]):
            expected[seen[s, i]] = r["probe_keys"][s, i]
        np.testing.assert_allclose(queues[0][s * G:(s + 1) * G], expected, atol=1e-5)
    # Rows not yet written keep their initial (random) keys.
    np.testing.assert_array_equal(queues[0][STEPS * G:], r["probe_queue_init"][STEPS * G:])


def _compare(r, name, skip=()):
    np.testing.assert_allclose(r[f"{name}_multi_loss"], r[f"{name}_single_loss"], atol=1e-5)
    keys = [k.split(":", 1)[1] for k in r if k.startswith(f"{name}_single:")]
    assert any("k_backbone" in k for k in keys) and "queue" in keys
    compared = 0
    for key in keys:
        if any(s in key for s in skip):
            continue
        np.testing.assert_allclose(r[f"{name}_multi:{key}"], r[f"{name}_single:{key}"],
                                   atol=1e-5, err_msg=key)
        compared += 1
    return compared


def test_sync_bn_two_replicas_step_equals_one_device_step(two_replicas):
    """SyncBN normalises with the global batch's statistics: 2 replicas == 1 device, including
    the BN moving statistics, the EMA key encoder, the weight decay and the queue."""
    assert _compare(two_replicas, "sync") > 20
    queues = two_replicas["sync_queue_replicas"]
    np.testing.assert_array_equal(queues[0], queues[1])


def test_shuffle_bn_two_replicas_equals_split_bn_on_one_device(two_replicas):
    """BN per replica with the key batch shuffled across replicas is what SplitBatchNorm with 2
    groups emulates on one device: the same images meet in each BN batch, so loss and weights
    agree (the BN moving statistics differ: each replica keeps its own)."""
    assert _compare(two_replicas, "split", skip=("moving_",)) > 10


def test_moco_v3_vit_two_replicas_equals_one_device(tmp_path):
    """A ViT has no BN in the backbone; with SyncBN in the heads and the keys of both replicas
    as negatives, MoCo v3's step on 2 replicas is the one-device step: losses and every weight
    (both encoders, predictor, AdamW's update) agree."""
    path = str(tmp_path / "vit.npz")
    _run(["vit", path])
    r = dict(np.load(path))
    np.testing.assert_allclose(r["multi_loss"], r["single_loss"], atol=1e-5)
    moved = np.abs(r["single"] - r["initial"])
    assert moved.mean() > 1e-3  # the steps moved the weights (lr 1e-2)
    # Adam divides each gradient by its own running size, so a weight whose gradient is at the
    # rounding level (the all-reduce sums in another order) may take a differently-rounded step:
    # a few weights differ by ~1% of one step, the rest agree to float32 precision.
    diff = np.abs(r["multi"] - r["single"])
    assert diff.max() < 2e-4 and np.mean(diff > 1e-5) < 1e-3


# --- two worker processes (MultiWorkerMirroredStrategy) ----------------------------------------


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_an_image_folder_trains_with_per_host_input_and_device_augmentation(tmp_path):
    path = str(tmp_path / "out.npz")
    _run(["records", path])
    out = dict(np.load(path))
    assert str(out["records_input"]) == "DistributedDatasetsFromFunction"
    assert int(out["records_steps"]) == STEPS
    assert np.isfinite(out["records_final_loss"])


@pytest.mark.slow
def test_multi_worker_two_processes_have_identical_queues(tmp_path):
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, "multi_worker", str(tmp_path)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        errors = [p.communicate(timeout=400)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-4000:]
    q0, q1 = np.load(tmp_path / "queue_0.npy"), np.load(tmp_path / "queue_1.npy")
    np.testing.assert_array_equal(q0, q1)
    assert int(np.load(tmp_path / "ptr_0.npy")) == int(np.load(tmp_path / "ptr_1.npy")) == STEPS * G
    # The two workers' halves of a global batch are different images: different keys.
    assert np.abs(q0[: G // 2] - q0[G // 2: G]).max() > 1e-3
    # The chief writes to the workdir, the other worker to a folder of its own.
    assert (tmp_path / "run" / "results.json").exists()
    assert (tmp_path / "run" / "worker1" / "results.json").exists()
    log = [json.loads(line) for line in open(tmp_path / "run" / "steps.jsonl")]
    assert [rec["step"] for rec in log] == list(range(1, STEPS + 1))

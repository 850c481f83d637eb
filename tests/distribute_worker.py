"""Runs MoCo on several replicas in a fresh process and saves what tests/test_distribute.py checks.

Devices must be configured before TensorFlow initialises them, so these runs cannot share the
pytest process:

  python tests/distribute_worker.py replicas OUT.npz
      2 logical CPU devices, MirroredStrategy: a queue/shuffle-BN probe run and 2-replica vs
      1-replica steps on the same global batches.
  python tests/distribute_worker.py records OUT.npz
      2 logical CPU devices, MirroredStrategy: train_and_evaluate on an image folder.
  TF_CONFIG=... python tests/distribute_worker.py multi_worker OUT_DIR
      one worker of a MultiWorkerMirroredStrategy cluster: `train_and_evaluate` for a few steps,
      then the queue is saved to OUT_DIR/queue_<task index>.npy.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH, QUEUE, STEPS, SIZE = 16, 64, 3, 8


def small_config(norm):
    from configs import synthetic

    c = synthetic.get_config()
    c.data.image_size = SIZE
    c.model.norm = norm
    c.model.split_bn_groups = 2
    c.moco.queue_size = QUEUE
    c.train.batch_size = GLOBAL_BATCH
    c.train.lr_schedule = "constant"
    c.train.verbose = 0
    return c


def fixed_batches(seed=0):
    """STEPS global batches of two views, as a dataset (fit splits each over the replicas)."""
    rng = np.random.default_rng(seed)
    shape = (STEPS * GLOBAL_BATCH, SIZE, SIZE, 1)
    views = {"view1": rng.uniform(size=shape).astype("float32"),
             "view2": rng.uniform(size=shape).astype("float32")}
    return views, tf.data.Dataset.from_tensor_slices(views).batch(GLOBAL_BATCH)


def local(strategy, variable):
    """The copy of a (Keras) variable on each replica, as numpy arrays."""
    return [v.numpy() for v in strategy.experimental_local_results(variable.value)]


def state(model):
    """Every variable of the query and key encoders, the queue and its pointer, by name."""
    key_backbone = getattr(model.key_backbone, "inner", model.key_backbone)  # under a Probe
    parts = {"q_backbone": model.backbone, "q_projector": model.projector,
             "k_backbone": key_backbone, "k_projector": model.key_projector}
    out = {f"{tag}/{i}/{w.path}": w.numpy()
           for tag, part in parts.items() for i, w in enumerate(part.weights)}
    out["queue"], out["queue_ptr"] = model.queue.numpy(), model.queue_ptr.numpy()
    return out


def install_probe(strategy, model):
    """Puts a layer in front of the key backbone that keeps the images each replica's key forward
    saw in the last step; returns a callback that collects them after every step:
    `.seen[step][replica]` = images [per-replica batch, H, W, C], in the order the encoder saw
    them."""
    import keras

    class Probe(keras.layers.Layer):
        def __init__(self, inner, shape):
            super().__init__(name="probe")
            self.inner = inner
            self.seen = self.add_weight(shape=shape, initializer="zeros", trainable=False,
                                        name="seen")
            self.built = True  # else fit's symbolic build would call MoCo on the raw dict

        def call(self, x, training=False):
            self.seen.assign(x)  # aggregation "none": each replica writes its own copy
            return self.inner(x, training=training)

    class Record(keras.callbacks.Callback):
        def __init__(self, probe):
            super().__init__()
            self.probe, self.seen = probe, []

        def on_train_batch_end(self, batch, logs=None):
            self.seen.append(local(strategy, self.probe.seen))

    with strategy.scope():
        probe = Probe(model.key_backbone,
                      (GLOBAL_BATCH // strategy.num_replicas_in_sync, SIZE, SIZE, 1))
    model.key_encoder.backbone = probe
    return Record(probe)


def fit_steps(model, ds, callbacks=()):
    """Trains STEPS steps; returns each step's loss over the global batch."""
    import keras

    losses = []
    log = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: losses.append(float(logs["batch_loss"]))
    )
    model.fit(ds, epochs=1, steps_per_epoch=STEPS, callbacks=[log, *callbacks], verbose=0)
    return losses


def equivalence_run(strategy, name, norm_multi, norm_single, out, momentum=0.99, probe=False):
    """The same STEPS global batches on `strategy` and on one device, from the same weights."""
    from moco_tf import train_lib

    c = small_config(norm_multi)
    c.moco.momentum = momentum
    c.train.weight_decay = 0.05  # large: a decay counted once per replica would show
    with strategy.scope():
        multi = train_lib.build_model(c)
    c.model.norm = norm_single
    single = train_lib.build_model(c)
    single.set_weights(multi.get_weights())
    record = install_probe(strategy, multi) if probe else None
    views, ds = fixed_batches(seed=1)
    queue_init = multi.queue.numpy()
    out[f"{name}_multi_loss"] = fit_steps(multi, ds, [record] if probe else [])
    out[f"{name}_single_loss"] = fit_steps(single, ds)
    for tag, model in (("multi", multi), ("single", single)):
        for key, value in state(model).items():
            out[f"{name}_{tag}:{key}"] = value
    out[f"{name}_queue_replicas"] = np.stack(local(strategy, multi.queue))
    out[f"{name}_ptr_replicas"] = np.stack(local(strategy, multi.queue_ptr))
    if probe:
        # Keys recomputed on one device, outside the strategy, with plain BN over exactly the
        # images each replica's key encoder saw (m = 1: the key encoder never changed):
        # [STEPS, replicas, per-replica batch, dim], in the probe's (shuffled) order.
        c.model.norm = "bn"
        plain = train_lib.build_model(c)
        plain.key_backbone.set_weights(multi.key_backbone.inner.get_weights())
        plain.key_projector.set_weights(multi.key_projector.get_weights())
        keys = [[tf.math.l2_normalize(plain.key_projector(plain.key_backbone(x, training=True)),
                                      1).numpy() for x in step] for step in record.seen]
        out.update(probe_seen=np.array(record.seen), probe_keys=np.array(keys),
                   probe_view2=views["view2"], probe_queue_init=queue_init)


def replicas_main(path):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from moco_tf import distribute

    strategy = distribute.create_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    out = {}
    keras.utils.set_random_seed(0)
    # SyncBN: BN statistics of the global batch, whatever the number of replicas.
    equivalence_run(strategy, "sync", "sync_bn", "sync_bn", out)
    # BN per replica + shuffle-BN across replicas == one device with BN over 2 sub-batches
    # (SplitBatchNorm); m = 1 and a probe on the key encoder's input for the queue checks.
    equivalence_run(strategy, "split", "bn", "split_bn", out, momentum=1.0, probe=True)
    np.savez(path, **out)


def vit_main(path):
    """MoCo v3 with a ViT, one step sequence on 2 replicas and on one device from the same weights:
    LayerNorm in the backbone, SyncBN in the heads and keys gathered over the replicas make them
    the same computation (a separate process: a second MirroredStrategy in one process mixes up
    collective keys)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from configs import moco_v3
    from moco_tf import distribute, train_lib

    strategy = distribute.create_strategy("mirrored")
    keras.utils.set_random_seed(0)
    c = moco_v3.get_config("vit_runlocal")
    c.data.image_size, c.model.patch_size = 16, 8  # 4 tokens
    c.train.batch_size, c.train.lr_schedule, c.train.verbose = GLOBAL_BATCH, "constant", 0
    c.train.base_learning_rate = 1e-2  # large enough for the steps to move the weights
    with strategy.scope():
        multi = train_lib.build_model(c)
    single = train_lib.build_model(c)
    single.set_weights(multi.get_weights())
    rng = np.random.default_rng(2)
    shape = (STEPS * GLOBAL_BATCH, 16, 16, c.data.channels)
    views = {f"view{i}": rng.uniform(size=shape).astype("float32") for i in (1, 2)}
    ds = tf.data.Dataset.from_tensor_slices(views).batch(GLOBAL_BATCH)
    out = {"initial": np.concatenate([w.ravel() for w in single.get_weights()])}
    for tag, model in (("multi", multi), ("single", single)):
        out[f"{tag}_loss"] = fit_steps(model, ds)
        out[tag] = np.concatenate([w.ravel() for w in model.get_weights()])
    np.savez(path, **out)


def records_main(path):
    """train_and_evaluate on an image folder under a 2-replica MirroredStrategy: every replica
    gets per-replica batches from `distribute_datasets_from_function`, augmented on the device.
    (A process of its own: a second MirroredStrategy in one process mixes up collective keys.)"""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    out, folder = {}, os.path.join(os.path.dirname(path), "records")
    from PIL import Image

    from moco_tf import train_lib

    rng = np.random.default_rng(0)
    for k in range(GLOBAL_BATCH * 2):
        os.makedirs(os.path.join(folder, "images", f"c{k % 2}"), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12 + k % 5, 14, 3), dtype=np.uint8)).save(
            os.path.join(folder, "images", f"c{k % 2}", f"{k}.jpg"))
    c = small_config("bn")
    c.train.strategy = "mirrored"
    c.data.update(dict(source="image_folder", data_dir=os.path.join(folder, "images"),
                       eval_dir=os.path.join(folder, "images"), channels=3, mean=(0.5,) * 3,
                       std=(0.25,) * 3, augment_on="device"))
    c.train.epochs, c.train.steps_per_epoch = 1, STEPS
    c.eval.knn_every_epochs, c.eval.export = 0, False
    model, results = train_lib.train_and_evaluate(c, os.path.join(folder, "run"))
    out["records_steps"] = np.int64(results["steps"])
    out["records_final_loss"] = np.float64(results["final_loss"])
    out["records_input"] = np.array(type(train_lib.train_input(
        c, model.distribute_strategy)).__name__)
    np.savez(path, **out)


def multi_worker_main(out_dir):
    from moco_tf import train_lib

    c = small_config("bn")
    c.train.strategy = "multi_worker"
    c.train.epochs, c.train.steps_per_epoch = 1, STEPS
    c.train.checkpoint_every_steps = 2
    c.eval.knn_every_epochs, c.eval.export = 0, False
    model, _ = train_lib.train_and_evaluate(c, os.path.join(out_dir, "run"))
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    np.save(os.path.join(out_dir, f"queue_{task}.npy"), model.queue.numpy())
    np.save(os.path.join(out_dir, f"ptr_{task}.npy"), model.queue_ptr.numpy())


if __name__ == "__main__":
    mode, target = sys.argv[1], sys.argv[2]
    {"replicas": replicas_main, "records": records_main, "vit": vit_main,
     "multi_worker": multi_worker_main}[mode](target)

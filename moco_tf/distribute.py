"""Devices: the `tf.distribute` strategy from a name, the precision they compute well in, and the
cross-replica helpers of `train_step`.

`create_strategy(name)` gives the strategy the model, optimizer and variables are created under
(`train.strategy` in the config); `resolve_precision` turns `precision="auto"` into a dtype policy
for the devices present. Inside `train_step` (replica context) the helpers below gather across
replicas; with one replica they are no-ops, so the same step runs on one device unchanged.
"""

import os

import tensorflow as tf
from absl import logging

from moco_tf.config import ConfigError

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def create_strategy(name="default", *, devices=None, tpu=None):
    """The `tf.distribute.Strategy` called `name`.

    Args:
      name: "default" (no distribution: one device), "mirrored" (all local GPUs, one replica each;
        without GPUs, all logical CPU devices), "multi_worker" (`MultiWorkerMirroredStrategy`: the
        cluster and this task come from the `TF_CONFIG` environment variable) or "tpu"
        (`TPUStrategy` through `TPUClusterResolver`).
      devices: "mirrored" only: explicit device names, e.g. ["/gpu:0", "/gpu:1"].
      tpu: "tpu" only: the TPU name or grpc address; default `$TPU_NAME`, else "local" (a TPU VM).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if devices is None:
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
            if len(devices) < 2:
                raise ConfigError(
                    "'train.strategy' is 'mirrored' but TensorFlow sees no GPU (and one CPU "
                    "device): there is nothing to mirror over. Check the GPU install "
                    "(pip install -e \".[gpu]\", nvidia-smi), or use train.strategy=default.")
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        address = tpu or os.environ.get("TPU_NAME", "local")
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (tf.errors.OpError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            first = first if len(first) <= 200 else first[:200].rsplit(" ", 1)[0] + " ..."
            raise ConfigError(
                f"'train.strategy' is 'tpu' but no TPU was found at {address!r} ({first}). Run "
                f"on a TPU VM, or set TPU_NAME to your TPU, or use train.strategy=default."
            ) from None
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


# /proc/cpuinfo flags of CPUs with bfloat16 arithmetic (x86: AVX512-BF16, AMX; Arm: BF16).
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def _cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bfloat16(cpu_flags=None) -> bool:
    """Whether the devices TensorFlow computes on do bfloat16 in hardware.

    TPUs and NVIDIA GPUs of compute capability 8.0 (Ampere) and newer do; a CPU only with the
    flags above. Elsewhere TensorFlow emulates bfloat16 convolutions on the CPU.
    """
    if tf.config.list_logical_devices("TPU"):
        return True
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = [tf.config.experimental.get_device_details(g) for g in gpus]
        return all(d.get("compute_capability", (0, 0)) >= (8, 0) for d in details)
    return bool((_cpu_flags() if cpu_flags is None else cpu_flags) & _CPU_BF16_FLAGS)


def resolve_precision(precision, cpu_flags=None) -> str:
    """The Keras dtype policy for `config.precision` on this machine's devices.

    "auto" is mixed_bfloat16 where the hardware computes bfloat16 (`native_bfloat16`), float32
    elsewhere; the other values are returned as they are, with a warning for mixed_bfloat16
    without hardware support: emulated bfloat16 runs a MoCo step several times slower than
    float32 (docs/distributed.md, "Precision and XLA").
    """
    native = precision in ("auto", "mixed_bfloat16") and native_bfloat16(cpu_flags)
    if precision == "auto":
        policy = "mixed_bfloat16" if native else "float32"
        logging.info("precision=auto: %s (bfloat16 %s in hardware here).", policy,
                     "computed" if native else "not computed")
        return policy
    if precision == "mixed_bfloat16" and not native:
        logging.warning(
            "precision=mixed_bfloat16, but no device here computes bfloat16 in hardware (no TPU, "
            "no GPU of compute capability >= 8.0, no AVX512-BF16/AMX CPU): TensorFlow emulates "
            "it, several times slower than float32. Use precision=auto or float32.")
    return precision


def is_chief(strategy) -> bool:
    """True unless this process is a non-chief worker of a multi-worker cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if task_type is None or task_type == "chief":
        return True
    # Without a "chief" task, worker 0 plays the chief (the TF convention).
    return (task_type == "worker" and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


def worker_workdir(workdir, strategy):
    """Where this process writes: `workdir` for the chief, `workdir/worker<i>` for other workers.

    Every worker must still take part in saving checkpoints (synchronised variables are reduced
    across workers when they are written), so the others write their copies to a directory of
    their own instead of racing the chief for the same files. Each worker resumes from its own copy.
    """
    if is_chief(strategy):
        return workdir
    return os.path.join(workdir, f"worker{strategy.cluster_resolver.task_id}")


# --- inside train_step (replica context) ------------------------------------------------------


def _replica_context():
    ctx = tf.distribute.get_replica_context()
    return ctx if ctx is not None and ctx.num_replicas_in_sync > 1 else None


def _gather(ctx, x):
    # tf.identity gives x this replica's device: all_gather takes its destination from the
    # tensor's device, which is empty for an input batch under MultiWorkerMirroredStrategy with
    # one device per worker ("ValueError: destinations can not be empty").
    return ctx.all_gather(tf.identity(x), axis=0)


def num_replicas() -> int:
    """Replicas in sync (1 outside a strategy); works in replica and cross-replica context."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # cross-replica context
        return tf.distribute.get_strategy().num_replicas_in_sync
    return ctx.num_replicas_in_sync


def all_gather(x):
    """x [N, ...] of every replica, concatenated in replica order: [N * replicas, ...]."""
    ctx = _replica_context()
    return x if ctx is None else _gather(ctx, x)


def gather_with_offset(x):
    """`all_gather(x)` and the index of this replica's first row in it."""
    ctx = _replica_context()
    if ctx is None:
        return x, 0
    offset = tf.shape(x)[0] * tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    return _gather(ctx, x), offset


def step_logs(logs):
    """`train_step`'s logs (scalars) in a shape Keras can average over the replicas.

    Across several workers Keras 3 averages them with `strategy.reduce("MEAN", v, axis=0)`, which
    fails for scalars ("Invalid reduction dimension 0", tensorflow/tensorflow#72388); there each
    value gets a leading axis of length 1, which that reduce averages away.
    """
    strategy = tf.distribute.get_strategy()
    if (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode()):
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


def _permutation(n, seed):
    """A permutation of range(n), a pure function of `seed` (int [2]): the same on every replica."""
    return tf.argsort(tf.random.stateless_uniform(tf.reshape(n, [1]), seed))


def batch_shuffle(x, seed):
    """Permutes x [N, ...] along the batch (shuffle-BN); returns (shuffled x, inverse permutation).

    The permutation is a pure function of `seed` (int [2]), so a resumed run shuffles identically.
    Undo with `tf.gather(y, inverse)`.
    """
    perm = _permutation(tf.shape(x)[0], seed)
    return tf.gather(x, perm), tf.argsort(perm)


def shuffle_across_replicas(x, seed):
    """Shuffle-BN over the global batch: this replica's share of a global permutation.

    As the official `_batch_shuffle_ddp` / `_batch_unshuffle_ddp`: gather the key images of all
    replicas, permute the global batch (the permutation is a pure function of `seed`, so every
    replica draws the same one without communicating), forward the replica's own slice, then
    gather the outputs and take back the rows of the replica's own images. A replica's BN batch
    thus holds images of every replica, not the ones its queries were normalised with.

    Args:
      x: this replica's images [N, ...]; `seed`: int [2].
    Returns:
      (shuffled [N, ...], unshuffle): forward `shuffled`, then `unshuffle(y)` maps the outputs
      y [N, ...] to the rows of `x`. With one replica: `batch_shuffle` within the batch.
    """
    ctx = _replica_context()
    if ctx is None:
        shuffled, inverse = batch_shuffle(x, seed)
        return shuffled, lambda y: tf.gather(y, inverse)
    n = tf.shape(x)[0]
    first = n * tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    x_all = _gather(ctx, x)
    perm = _permutation(tf.shape(x_all)[0], seed)
    inverse = tf.argsort(perm)

    def unshuffle(y):
        return tf.gather(_gather(ctx, y), inverse[first:first + n])

    return tf.gather(x_all, perm[first:first + n]), unshuffle


def check_config(config, strategy):
    """Raises `ConfigError` if `config` cannot run under `strategy`; returns the per-replica batch.

    Needs the strategy (not only the config): the number of replicas is known only once the
    devices are.
    """
    replicas = strategy.num_replicas_in_sync
    batch, t = config.train.batch_size, config.train
    if batch % replicas:
        raise ConfigError(
            f"'train.batch_size' ({batch}) is the global batch and must be divisible by the "
            f"{replicas} replicas of strategy '{t.strategy}'; "
            f"try {max(1, batch // replicas) * replicas}."
        )
    per_replica = batch // replicas
    if config.model.norm == "split_bn" and per_replica % config.model.split_bn_groups:
        raise ConfigError(
            f"'model.split_bn_groups' ({config.model.split_bn_groups}) must divide the batch per "
            f"replica ({batch} / {replicas} = {per_replica})."
        )
    if t.jit_compile and replicas > 1 and not isinstance(strategy, tf.distribute.TPUStrategy):
        raise ConfigError(
            f"'train.jit_compile' = True does not run with {replicas} replicas of "
            f"'{t.strategy}' in Keras 3 (keras-team/keras#19005); set it to False."
        )
    return per_replica

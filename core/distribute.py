"""Data parallelism on tf.distribute, written out: k replicas, each a copy of the model on its own device.

    strategy = make_strategy("mirrored", cpu_devices=2)    # or "default", "multi_worker"
    with strategy.scope():
        model, optimizer = ..., ...                          # every variable mirrored on each replica
    batches = distribute_batches(strategy, dataset)          # global batch G -> k slices of G / k

One step on replica r (of k), with x_r its slice of the global batch of G examples:

    L_r   = sum_{i in slice r} loss_i / G              this replica's share of the global mean loss
    g_r   = dL_r / dw                                  local gradients, no communication
    g     = all_reduce(SUM, g_r)  = sum_r g_r          the only exchange: 4 bytes per parameter
          = d/dw (sum_i loss_i / G)                    the gradient of the global mean loss
    w    <- optimizer(w, g)                            the same g on every replica: the same update

Dividing by G (not by the replica's own G / k) is what makes the sum the global mean; with k = 1 the
step is exactly the single-device step. Every replica then holds bit-identical weights without ever
sending a weight.

Variables and their synchronization (chosen where they are created):
  weights, Adam's m and v, the optimizer's step, the learning rate, the run position, the NaN guard's
  record: ON_WRITE (mirrored), aggregation NONE. Each replica updates its own copy from values that
  are already identical on every replica (all-reduced gradients, the same step count), so no update
  needs a merge; checkpoints save one copy and restore it to every replica.
  BatchNorm moving statistics: ON_READ, aggregation MEAN (what Keras does). Each replica keeps the
  moving averages of its own batch statistics; a checkpoint, an export or any read outside the step
  sees their mean. With sync batch norm every replica's copy is the same anyway.
  Metric totals and counts: ON_READ, aggregation SUM. Each replica adds its own examples; reading sums
  over replicas; a checkpoint stores the sum and a restore with k replicas gives each sum / k.
"""
import errno
import functools
import json
import os
import re
import shutil
import signal
import socket
import tempfile

import numpy as np
import tensorflow as tf

from core.names import STRATEGIES
from core.native_logs import quiet_native_logs

__all__ = ["STRATEGIES", "DistributeError", "configure_cpu_devices", "make_strategy", "replica_batch_size",
           "distribute_batches", "all_reduce_sum", "all_reduce_gradients", "on_every_replica",
           "cross_replica_moments", "check_in_scope", "settle", "worker_index", "is_chief", "WorkerDirectory",
           "WorkerTable", "WorkerVote", "lost_worker", "server_failure", "not_joined", "describe"]

# Seconds a collective waits for its peers before failing: how long a lost worker can stall the others.
DEFAULT_TIMEOUT_SECONDS = 60.0
# Seconds a multi-worker start waits for every worker of TF_CONFIG to join (schedulers may start them minutes apart).
DEFAULT_JOIN_SECONDS = 600.0
# Logical CPU devices per core at most: each has its own executor threads and buffers (256 on 2 cores took
# 523 threads, 11 GB and minutes per step), and more replicas than cores only share the same cores.
CPU_DEVICES_PER_CORE = 4


class DistributeError(ValueError):
    """A strategy cannot be built as asked (bad name, devices already initialized, batch does not divide)."""


def configure_cpu_devices(count):
    """Splits the first physical CPU into `count` logical devices (/CPU:0 ... /CPU:count-1).

    Must run before TensorFlow initializes its devices (before any op); each logical device gets its
    own executor, so a MirroredStrategy over them behaves as k devices (sharing the same cores).
    """
    if count < 1:
        raise DistributeError(f"--cpu_devices must be >= 1, got {count}")
    cores = os.cpu_count() or 1
    if count > CPU_DEVICES_PER_CORE * cores:
        raise DistributeError(f"--cpu_devices={count} is more than this machine can run: at most "
                              f"{CPU_DEVICES_PER_CORE * cores} ({CPU_DEVICES_PER_CORE} per core, {cores} cores)")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != count:
            raise DistributeError(f"cannot split the CPU into {count} devices: TensorFlow already started with "
                                  f"{have} (configure devices before any op)") from None


def make_strategy(name="default", cpu_devices=None, timeout_seconds=DEFAULT_TIMEOUT_SECONDS,
                  join_seconds=DEFAULT_JOIN_SECONDS):
    """The tf.distribute strategy called `name`:

    default:      no distribution, one replica on the default device (the plain single-device loop).
    mirrored:     one replica per local GPU; without GPUs, one per logical CPU (cpu_devices of them).
    multi_worker: MultiWorkerMirroredStrategy from the TF_CONFIG environment variable; every worker
                  runs this same program; it waits at most `join_seconds` for every worker to join
                  (`_join`), and collectives fail after `timeout_seconds` if a peer is lost.
    """
    if name not in STRATEGIES:
        raise DistributeError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    if cpu_devices is not None:
        configure_cpu_devices(cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        return _mirrored(tuple(d.name for d in gpus) or tuple(d.name for d in tf.config.list_logical_devices("CPU")))
    if "TF_CONFIG" not in os.environ:
        raise DistributeError("--strategy=multi_worker needs the TF_CONFIG environment variable (see "
                              "docs/distributed.md, or start local workers with python -m cluster.launch)")
    try:
        config = json.loads(os.environ["TF_CONFIG"])
    except ValueError as error:
        raise DistributeError(f"TF_CONFIG is not valid JSON: {error}") from None
    _check_task(config)
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds=timeout_seconds)
    return _join(config, options, join_seconds)


def _check_task(config):
    """DistributeError unless TF_CONFIG names a cluster of chief/worker addresses and a task that is one of them."""
    cluster = config.get("cluster") if isinstance(config, dict) else None
    jobs = {job: addresses for job, addresses in (cluster or {}).items()
            if job in ("chief", "worker") and isinstance(addresses, list) and addresses}
    if not jobs:
        raise DistributeError('TF_CONFIG has no cluster of "chief" or "worker" addresses (see docs/distributed.md)')
    task = config.get("task")
    kind, index = (task.get("type"), task.get("index")) if isinstance(task, dict) else (None, None)
    if kind not in jobs or isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(jobs[kind]):
        have = ", ".join(f"{job} 0..{len(addresses) - 1}" for job, addresses in jobs.items())
        raise DistributeError(f"TF_CONFIG's task {json.dumps(task)} is not one of its cluster's ({have})")


def _join(config, options, seconds):
    """MultiWorkerMirroredStrategy, its start bounded: TensorFlow waits for every worker of the cluster to
    register with the leader (worker 0, or the chief) inside one call that holds Python's interpreter lock, so
    no signal handler or thread can run until it returns, and by default it waits an hour. Here the wait is a
    barrier of `seconds` (the coordination service MultiWorkerMirroredStrategy would configure, with
    `cluster_register_with_barrier`, which its public setter does not take): past it every waiting worker gets
    DeadlineExceeded, one line naming the workers that are not up. Meanwhile SIGINT keeps the system's default
    action and ends the process at once (nothing has been written yet); so does SIGTERM until TensorFlow's
    preemption notifier installs its own handler, which only records it. Python's handlers come back after.
    """
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    spec = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
    if spec.as_dict() and context.context().coordination_service is None:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        context.context().configure_coordination_service(
            service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
            cluster_register_timeout_in_ms=int(seconds * 1000),
            coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
                              for job in ("chief", "worker") if job in spec.jobs])
        context.context().coordination_service.cluster_register_with_barrier = True
    handlers = {signum: signal.signal(signum, signal.SIG_DFL) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with quiet_native_logs(replay_on_error=False):  # the C++ runtime's account of a failed join: our line
            return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except tf.errors.DeadlineExceededError:
        raise DistributeError(not_joined(config, seconds)) from None
    except tf.errors.OpError as error:
        if "server" not in str(error):
            raise
        raise DistributeError(server_failure(config)) from None
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def not_joined(config, seconds):
    """One line for a start whose workers did not all join within `seconds`: the other workers whose address
    takes no connection (not started, or elsewhere), else all of them."""
    task = config.get("task", {})
    me = (task.get("type"), task.get("index"))
    missing = []
    for job in ("chief", "worker"):
        for index, address in enumerate(config.get("cluster", {}).get(job, [])):
            if (job, index) == me:
                continue
            host, _, port = address.rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
            except (OSError, ValueError):
                missing.append(f"{job} {index} ({address})")
    who = ", ".join(missing) if missing else "the workers of TF_CONFIG"
    return (f"{who} did not join within --join_timeout={seconds:g} s; start every worker of TF_CONFIG with the "
            f"same command")


def server_failure(config):
    """One line for a worker whose server (gRPC, listening on every interface at its TF_CONFIG address's
    port) could not start: which address, and whether another program holds the port."""
    try:
        task = config["task"]
        address = config["cluster"][task["type"]][task["index"]]
        port = int(address.rsplit(":", 1)[1])
    except (KeyError, IndexError, TypeError, ValueError):
        return "cannot start this worker's server: TF_CONFIG does not give this task an address host:port"
    where = f"cannot start the server of {task['type']} {task['index']} at {address} (TF_CONFIG)"
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError as error:
            taken = error.errno == errno.EADDRINUSE
            return f"{where}: " + (f"port {port} is in use by another program" if taken else error.strerror)
    return where


@functools.lru_cache(maxsize=None)
def _mirrored(devices):
    """One MirroredStrategy per device set and process: every new one numbers its collectives from the same
    keys, so two alive in one process (e.g. in tests) would mix up each other's all-reduces."""
    return tf.distribute.MirroredStrategy(list(devices))


def replica_batch_size(global_batch, strategy):
    """global_batch / replicas; DistributeError if the replicas cannot share it equally."""
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise DistributeError(f"--batch_size={global_batch} (the global batch) does not divide among "
                              f"{replicas} replicas; use a multiple of {replicas}")
    return global_batch // replicas


def distribute_batches(strategy, dataset, exact=True):
    """A dataset of global batches -> what `strategy.run` takes (the dataset itself with one replica).

    exact (training): replica r of k gets rows [r B, (r + 1) B) of each global batch of k B rows. Each
      worker builds the whole global batch (the same on every worker: same seed) and keeps only its own
      replicas' rows, so the split is visible and the union of the slices is exactly the global batch.
    not exact (evaluation): tf.distribute's own split, which also shares a last, smaller batch.
    """
    if strategy.num_replicas_in_sync == 1:
        return dataset
    if not exact:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return strategy.experimental_distribute_dataset(dataset.with_options(options))

    def per_worker(context):
        replicas = context.num_replicas_in_sync
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def my_slices(images, labels):
            """[k B, ...] -> this worker's [local, B, ...]: replica first + j gets slice j."""
            size = tf.shape(labels)[0] // replicas
            return tuple(tf.reshape(t[first * size:(first + local) * size],
                                    tf.concat([[local, size], tf.shape(t)[1:]], 0)) for t in (images, labels))

        # One element per local replica, in replica order: strategy.run hands element j to replica j.
        return dataset.map(my_slices).unbatch()

    return strategy.distribute_datasets_from_function(per_worker)


def _replica_context():
    """The replica context when there are several replicas, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def all_reduce_sum(values):
    """sum over replicas of `values` (any nest of tensors), the same result on every replica.

    Inside strategy.run this is one collective (tensors packed together); with one replica, `values`.
    """
    context = _replica_context()
    return values if context is None else context.all_reduce(tf.distribute.ReduceOp.SUM, values)


def all_reduce_gradients(loss, gradients):
    """This replica's (mean loss over its B = G / k examples, gradients) -> the global batch's, on every replica:

        L = sum_r L_r / k = sum_i loss_i / G          g = sum_r g_r / k = dL / dw

    Each replica scales its own share by 1 / k before the sum (the loss averaged over the global batch,
    what tf.nn.compute_average_loss does), then one all-reduce SUM carries the loss and every gradient.
    With one replica: (loss, gradients) unchanged.
    """
    context = _replica_context()
    if context is None:
        return loss, gradients
    share = 1.0 / context.num_replicas_in_sync
    return context.all_reduce(tf.distribute.ReduceOp.SUM, (loss * share, [g * share for g in gradients]))


def on_every_replica(flags):
    """[n] bool -> [n] bool: True where the flag holds on every replica (the same answer on all of them)."""
    context = _replica_context()
    if context is None:
        return flags
    failures = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(flags), tf.float32))
    return tf.equal(failures, 0.0)


def cross_replica_moments(x, axes):
    """mean, variance of x over `axes` and over every replica's x (the global batch):

        n = all_reduce(count),  S = all_reduce(sum x),  Q = all_reduce(sum x^2)
        mean = S / n,           variance = Q / n - mean^2

    One collective of 2 C + 1 numbers per call (C channels), differentiable (the gradient of an
    all-reduce is the all-reduce of the gradients). With one replica these are the batch's moments.
    """
    count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
    total, squares, count = all_reduce_sum([tf.reduce_sum(x, axis=axes), tf.reduce_sum(tf.square(x), axis=axes),
                                            count])
    mean = total / count
    variance = tf.maximum(squares / count - tf.square(mean), 0.0)
    return mean, variance


def check_in_scope(strategy, variables):
    """ValueError naming the first variable not created under `strategy.scope()` (it would not be mirrored)."""
    for variable in variables:
        if not strategy.extended.variable_created_in_scope(variable):
            raise ValueError(f"variable {variable.name} was created outside the strategy's scope: construct the "
                             f"model and the optimizer under `with strategy.scope():`")


def settle(variables):
    """Every ON_READ / MEAN variable gets, on every replica, the mean of its replicas' copies (its read value)."""
    for variable in variables:
        if (variable.synchronization == tf.VariableSynchronization.ON_READ
                and variable.aggregation == tf.VariableAggregation.MEAN):
            variable.assign(variable.read_value())


# ----------------------------------------------------------------------------------------- workers

def worker_index(strategy):
    """(index, count) of this worker: (0, 1) unless the strategy spans several machines."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0, 1
    workers = resolver.cluster_spec().as_dict()
    count = sum(len(tasks) for job, tasks in workers.items() if job in ("chief", "worker"))
    index = resolver.task_id + (1 if resolver.task_type == "worker" and "chief" in workers else 0)
    return index, count


class WorkerTable:
    """Every worker's row of `width` numbers, gathered on every worker: table(row) -> [workers, width] array, row i
    from worker i. One small all-reduce: each worker puts its row in its own line of a table of zeros (its first
    replica does; the others add zeros) and the sum is the table. Every worker must call it at the same point
    of its program; without a cluster there is no collective: [row]. Rows are float32, so integers up to 2^24
    arrive exactly."""

    def __init__(self, strategy, width=1):
        self.index, self.count = worker_index(strategy)
        self.width = width
        self._sum = None
        if self.count > 1:
            per_worker = max(strategy.num_replicas_in_sync // self.count, 1)

            def total(table):
                def own_line():
                    first = tf.distribute.get_replica_context().replica_id_in_sync_group % per_worker == 0
                    return tf.where(first, table, tf.zeros_like(table))
                return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(own_line), axis=None)
            self._sum = tf.function(total)

    def __call__(self, row):
        row = np.asarray(row, np.float32).reshape([self.width])
        if self._sum is None:
            return row[np.newaxis]
        table = np.zeros([self.count, self.width], np.float32)
        table[self.index] = row
        return self._sum(tf.constant(table)).numpy()


class WorkerVote:
    """Which workers ask for something, answered alike on every worker: vote(asks) -> the indices of the workers
    that passed True. A decision one worker may take alone (a signal stops it) must be taken by all of them at
    the same step, or the others wait in a collective it never joins. One WorkerTable exchange per vote."""

    def __init__(self, strategy):
        self._table = WorkerTable(strategy)

    def __call__(self, asks):
        return [int(i) for i in np.flatnonzero(self._table([1.0 if asks else 0.0])[:, 0] > 0)]


def is_chief(strategy):
    """Does this process write the run (checkpoints, TensorBoard, SavedModel)? The 'chief' task if the cluster
    has one, else worker 0; always true without a cluster."""
    return worker_index(strategy)[0] == 0


class WorkerDirectory:
    """Where this worker writes what the chief writes to `path`: `path` itself on the chief, a temporary
    directory on every other worker (they must take part in saves, whose collectives need every worker,
    but their files are copies nobody reads). `cleanup()` removes the temporary one."""

    def __init__(self, path, strategy):
        self.chief = is_chief(strategy)
        index = worker_index(strategy)[0]
        self.path = path if self.chief else tempfile.mkdtemp(prefix=f"tf-by-hand-worker{index}-")

    def cleanup(self):
        if not self.chief:
            shutil.rmtree(self.path, ignore_errors=True)


def lost_worker(error):
    """For an error raised by a failed collective: 'worker i (host:port)' naming the peer it lost (not this
    worker, which the message may also name), or None."""
    text = str(error)
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    except ValueError:
        config = {}
    cluster, task = config.get("cluster", {}), config.get("task", {})
    me = (task.get("type"), task.get("index"))
    named = [(job, int(index)) for job, index in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", text)]
    named += [(job, index) for job, addresses in cluster.items() for index, address in enumerate(addresses)
              if re.search(rf"{re.escape(address)}(?!\d)", text)]
    for job, index in named:
        if (job, index) != me:
            addresses = cluster.get(job, [])
            return f"{job} {index}" + (f" ({addresses[index]})" if index < len(addresses) else "")
    return None


def describe(strategy):
    """One line: 'mirrored: 2 replicas on /CPU:0, /CPU:1' / 'multi_worker: worker 1 of 2, 2 replicas' / ..."""
    replicas = strategy.num_replicas_in_sync
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        index, count = worker_index(strategy)
        return f"multi_worker: worker {index} of {count}, {replicas} replicas in all"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        devices = ", ".join(device.split("/")[-1].replace("device:", "") for device in strategy.extended.worker_devices)
        return f"mirrored: {replicas} replica{'' if replicas == 1 else 's'} on {devices}"
    return "default: one replica"

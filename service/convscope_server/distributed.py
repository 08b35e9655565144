"""Dataset scans on a Ray cluster (the ``distributed`` extra; server flag ``--ray``).

The pipeline of one scan (Ray Data, https://docs.ray.io/en/latest/data/):

1. The driver (this server) lists the dataset folder exactly as a local scan does (``DataRoot.folder``,
   ``folder_items``: confined to the data root, sorted, counted against the limits before anything is
   read) and hands Ray Data the rows ``(index, id, path)``. The data root must be mounted at the same path
   on every node (shared storage).
2. ``map_batches`` tasks decode the files where they run, with ``datasets.load_file`` (which refuses a
   file resolving outside the data root, as locally); an unreadable file becomes a failed row carrying the
   same ItemError reason a local scan gives (``datasets.item_failure``).
3. ``map_batches`` with an actor pool: each actor holds one onnxruntime session on the scan's probe graph
   (the model with the scanned tensors exposed: the same graph, optimisation level and input conversion
   as the server's own probe sessions), on a GPU when the cluster has GPUs (one per actor), else one CPU
   thread per actor. Per image it returns a patch scan's per-channel maxima and positions
   (``patches.channel_maxima``) or a gallery's code, thumbnail and predicted class.
4. The driver merges batches as they arrive (``preserve_order``): rows are taken in scan-index order, each
   index once, so a batch that Ray runs again after a worker died (actors restart, their tasks retry, by
   Ray Data's defaults) is dropped on arrival. Patch maxima go through ``TopActivations.merge`` (ordered
   by value, then scan index: the table one local pass builds), gallery rows to the gallery writer in
   index order, failures to the job's ItemError events in index order. Progress counts merged images.

Stopping (cancel, deadline, --max-job-seconds, shutdown) closes the Ray Data iterator between batches,
which shuts the execution down: its tasks are cancelled and its actors killed.

The result equals the single-machine scan's when the workers run the same onnxruntime build on the same
kind of device: onnxruntime's CPU outputs were checked not to depend on batch composition or intra-op
threads (tests/test_distributed.py compares whole results); GPU actors give GPU numbers.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convscope_server.datasets import Item, ItemFailure, item_failure, load_file
from convscope_server.errors import InvalidArgument, Unavailable

log = logging.getLogger("convscope_server")

CPU_BATCH, GPU_BATCH = 16, 128     # images per actor call, as onnxruntime's run batch on each device


class Cluster:
    """The Ray cluster a server sends dataset scans to. ``address``: ``local`` starts a one-machine cluster
    in this process (its node address is the loopback); ``auto`` joins the cluster this machine is part of
    (``RAY_ADDRESS``, or the last ``ray start`` here); anything else is a cluster address (``head:6379``,
    or ``ray://head:10001`` for Ray Client). ``actors``: inference actors per scan (0: one per GPU of the
    cluster, or one per CPU when it has none). ``by_default``: scans of dataset folders run here unless the
    request asks for the server."""

    def __init__(self, address: str, actors: int = 0, by_default: bool = False, device: str = "auto"):
        self.address = address.strip()
        self.actors = actors
        self.by_default = by_default
        self.device = device      # the server's --device: "cpu" keeps the actors off the cluster's GPUs
        self.owned = False        # this server started (local) or connected the Ray runtime: it ends it

    def check(self) -> None:
        """The flags and the extra, before any slow start-up work; ValueError naming the flag."""
        if self.actors < 0:
            raise ValueError(f"--ray-actors: must be 0 (one per GPU or CPU of the cluster) or more, not {self.actors}")
        if self.address == "local" and "ray" not in sys.modules:
            # Ray picks the machine's routable address for its node; a one-machine cluster keeps to loopback.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray  # noqa: F401
            import ray.data  # noqa: F401
        except ImportError as error:
            raise ValueError(f"--ray: Ray is not installed ({error}); install the distributed extra: "
                             "pip install 'convscope[distributed]'") from None

    def connect(self) -> None:
        """Start or join the cluster (at server start-up); ValueError naming --ray when it cannot."""
        self.check()
        import ray

        if ray.is_initialized():  # this process is already a driver (an embedding application, the tests)
            log.info("Ray: using this process's existing connection")
        else:
            options = {"log_to_driver": False, "configure_logging": False}
            try:
                if self.address == "local":   # "local": a new instance, never the last `ray start` cluster
                    ray.init(address="local", include_dashboard=False, **options)
                else:
                    ray.init(address=self.address, **options)
            except Exception as error:  # noqa: BLE001 - any failure to connect is the flag's
                ray.shutdown()   # what a half-started local node left running (its GCS) stops here
                raise ValueError(f"--ray: cannot {'start' if self.address == 'local' else 'join'} the Ray cluster "
                                 f"{self.address!r}: {type(error).__name__}: {error}") from None
            self.owned = True
        ray.data.DataContext.get_current().enable_progress_bars = False   # no terminal: the client shows progress
        if not log.isEnabledFor(logging.DEBUG):
            logging.getLogger("ray.data").setLevel(logging.WARNING)        # not its INFO lines on every scan
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)   # "progress bars disabled"
        log.info("Ray cluster %s: %s", self.address, self.describe())

    def resources(self) -> tuple[int, int, int]:
        """(nodes, CPUs, GPUs) of the cluster now."""
        import ray

        total = ray.cluster_resources()
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        return nodes, int(total.get("CPU", 0)), int(total.get("GPU", 0))

    def describe(self) -> str:
        nodes, cpus, gpus = self.resources()
        return f"{nodes} node{'s' * (nodes != 1)}, {cpus} CPUs, {gpus} GPUs"

    def shutdown(self) -> None:
        """Leave the cluster (a ``local`` one stops with it). Only what this server started or joined."""
        if self.owned:
            import ray

            ray.shutdown()
            self.owned = False

    # -- one scan ---------------------------------------------------------------------------------------
    def run(self, plan: Plan, model_bytes: bytes, items: list[Item], deliver: Callable[[list[int], dict], None],
            on_failure: Callable[[ItemFailure], None], progress: Callable, should_stop: Callable[[], bool],
            stage: str) -> RunReport:
        """Scan ``items`` (a dataset folder's, indices 0..N-1) with ``plan`` on the cluster. ``deliver(indices,
        rows)`` gets the readable images' rows in index order (numpy arrays keyed like the plan's outputs),
        ``on_failure`` the unreadable ones, each index exactly once; stops between batches when
        ``should_stop()`` turns true."""
        import ray

        report = RunReport()
        if not items:
            return report
        nodes, cpus, gpus = self.resources()
        gpu = gpus > 0 and self.device != "cpu"
        actors = self.actors or max(1, gpus if gpu else cpus)
        plan = plan.on_device(gpu)
        progress(0, len(items), f"starting {actors} Ray actor{'s' * (actors != 1)} on {nodes} "
                                f"node{'s' * (nodes != 1)}")
        per_block = plan.run_batch * max(1, math.ceil(len(items) / (plan.run_batch * 1000)))
        rows = [{"index": item.index, "id": item.id, "path": str(item.path or ""), "problem": item.problem}
                for item in items]
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / per_block)))
        dataset.context.execution_options.preserve_order = True
        model_ref = ray.put(model_bytes)   # held here until the scan ends: a restarted actor reads it again
        dataset = dataset.map_batches(
            _decode, batch_size=plan.run_batch, num_cpus=1,
            fn_kwargs={"root": str(plan.root), "config": plan.config, "max_pixels": plan.max_pixels,
                       "shape": plan.input_shape})
        compute = ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors)
        resources = {"num_gpus": 1} if gpu else {"num_cpus": 1}
        dataset = dataset.map_batches(_Infer, batch_size=plan.run_batch, compute=compute,
                                      fn_constructor_kwargs={"plan": plan, "model": model_ref}, **resources)
        merger = _InOrder(len(items), deliver, on_failure, {item.index: item.id for item in items})
        batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
        try:
            for batch in batches:
                report.providers.update(str(p) for p in batch["provider"][batch["ok"]])
                report.duplicates += merger.push(batch)
                progress(merger.done, len(items), stage)
                if should_stop():
                    report.stopped = True
                    break
        except ray.exceptions.RayError as error:   # the cluster, not the request: a retry may succeed
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise Unavailable(f"the Ray cluster could not finish the scan after {merger.done} of {len(items)} "
                              f"images: {type(error).__name__}: {reason[:500]}") from None
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # ends the streaming execution: tasks cancelled, actors killed
            del model_ref
        report.merged = merger.done
        if merger.done < len(items) and not report.stopped:
            raise RuntimeError(f"the Ray scan ended after {merger.done} of {len(items)} images")
        if report.duplicates:
            log.info("Ray scan: %d image(s) came back twice (a batch re-run after a worker died) and were "
                     "counted once", report.duplicates)
        return report


@dataclass
class RunReport:
    merged: int = 0
    duplicates: int = 0
    stopped: bool = False
    providers: set = field(default_factory=set)

    @property
    def provider(self) -> str:
        return ", ".join(sorted(self.providers))


@dataclass(frozen=True)
class Plan:
    """What every worker needs for one scan (pickled to them): how to decode, how to run, what to keep."""

    kind: str                       # "patches", "gallery" or "rows" (the audit's per-image reduction)
    root: Path                      # the data root, at the same path on every node
    config: object                  # the model's ModelConfig (preprocessing, layout, logits output)
    max_pixels: int
    input_shape: tuple[int, ...]    # one model input sample
    fixed_batch: int
    run_batch: int
    precision: str
    outputs: tuple[str, ...]
    layer: str
    layout: str = ""                # patches: the layer's layout and channel axis, the channels tracked
    axis: int = 1
    channels: tuple[int, ...] = ()
    side: int = 0                   # gallery: thumbnail side
    gpu: bool = False
    reduce: object = None           # rows: per-batch function of the outputs' values -> per-image arrays

    def on_device(self, gpu: bool) -> Plan:
        from dataclasses import replace

        return replace(self, gpu=gpu, run_batch=GPU_BATCH if gpu else CPU_BATCH)


def patches_plan(model, layer, axis: int, channels, root: Path, max_pixels: int) -> Plan:
    return Plan("patches", Path(root), model.config, max_pixels, _input_shape(model.config), model.fixed_batch,
                model.run_batch, model.precision, (layer.name,), layer.name, layer.layout or "", axis,
                tuple(int(c) for c in channels))


def gallery_plan(model, layer_name: str, side: int, root: Path, max_pixels: int) -> Plan:
    outputs = tuple(dict.fromkeys([layer_name, model.config.logits_output]))
    return Plan("gallery", Path(root), model.config, max_pixels, _input_shape(model.config), model.fixed_batch,
                model.run_batch, model.precision, outputs, layer_name, side=side)


def rows_plan(model, outputs, reduce, root: Path, max_pixels: int) -> Plan:
    return Plan("rows", Path(root), model.config, max_pixels, _input_shape(model.config), model.fixed_batch,
                model.run_batch, model.precision, tuple(outputs), "", reduce=reduce)


def audit_scan(cluster: Cluster, model, root: Path, max_pixels: int, progress=None):
    """The audit scan's ``remote`` (:func:`convscope_server.audit.scan.scan`): its per-image reduction
    (``reduce_batch``) run by the cluster's actors over a dataset folder's items, rows delivered in scan
    order. ``progress(done, total, stage)`` hears the cluster's start ("starting N Ray actors ..."); the
    scan reports the merged count itself."""
    import functools

    from convscope_server.audit.scan import reduce_batch

    def run(plan, items, deliver, on_failure, should_stop):
        work = rows_plan(model, plan.outputs, functools.partial(reduce_batch, plan), root, max_pixels)
        def starting(done, total, stage):
            if progress is not None and stage.startswith("starting"):
                progress(done, total, stage)

        return cluster.run(work, probe_bytes(model, plan.outputs), items, deliver, on_failure, starting,
                           should_stop, "scanning on the Ray cluster")
    return run


def probe_bytes(model, outputs) -> bytes:
    """The serialized probe graph the server's own probe session for ``outputs`` runs."""
    from convscope_server.onnx.probes import with_outputs

    return with_outputs(model.proto, sorted(set(outputs))).SerializeToString()


def _input_shape(config) -> tuple[int, ...]:
    if config.layout == "NCHW":
        return (config.channels, config.height, config.width)
    return (config.height, config.width, config.channels)


# -- on the workers ------------------------------------------------------------------------------------
def _decode(batch: dict, root: str, config, max_pixels: int, shape) -> dict:
    """Ray Data task: decode each row's file into a model input (zeros and the reason for unreadable ones)."""
    count = len(batch["index"])
    inputs = np.zeros((count, *shape), np.float32)
    ok = np.zeros(count, bool)
    reasons = [""] * count
    base = Path(root)
    for row in range(count):
        try:
            if batch["problem"][row]:   # listed on the driver as unscannable (a FIFO, an unlistable folder ...)
                raise InvalidArgument("file", str(batch["problem"][row]))
            inputs[row] = load_file(Path(str(batch["path"][row])), base, config, max_pixels)
            ok[row] = True
        except Exception as error:  # noqa: BLE001 - an unreadable item is reported, never fatal
            reasons[row] = item_failure(int(batch["index"][row]), str(batch["id"][row]), error).reason
    return {"index": np.asarray(batch["index"], np.int64), "ok": ok, "reason": np.asarray(reasons, object),
            "input": inputs}


class _Infer:
    """Ray Data actor: one onnxruntime session on the scan's probe graph, per-image results per batch."""

    def __init__(self, plan: Plan, model):
        import ray

        from convscope_server.onnx.session import SessionSettings, create_session

        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        self.plan = plan
        settings = SessionSettings("auto" if plan.gpu else "cpu", 0 if plan.gpu else 1, plan.precision or "exact")
        self.session = create_session(model, settings)
        self.provider = self.session.get_providers()[0]

    def __call__(self, batch: dict) -> dict:
        from convscope_server import render
        from convscope_server.forward import activations as acts
        from convscope_server.forward.neighbors import thumbnail
        from convscope_server.forward.patches import channel_maxima
        from convscope_server.onnx.session import INPUT_DATATYPES, graph_input, run_batched

        plan, ok = self.plan, np.asarray(batch["ok"], bool)
        count = len(ok)
        inputs = np.asarray(batch["input"], np.float32)[ok]
        values = {}
        if len(inputs):
            outputs = run_batched(self.session, plan.config.input_name,
                                  graph_input(inputs, INPUT_DATATYPES[plan.config.input_datatype]),
                                  list(plan.outputs), plan.fixed_batch, plan.run_batch,
                                  self.provider == "CUDAExecutionProvider")
            values = dict(zip(plan.outputs, outputs))
        result = {"index": batch["index"], "ok": ok, "reason": batch["reason"],
                  "provider": np.asarray([self.provider] * count, object)}
        if plan.kind == "rows":
            if not len(inputs):  # no readable image: zero rows of the right shapes (never delivered)
                shaped = run_batched(self.session, plan.config.input_name,
                                     graph_input(np.zeros((1, *plan.input_shape), np.float32),
                                                 INPUT_DATATYPES[plan.config.input_datatype]),
                                     list(plan.outputs), plan.fixed_batch, plan.run_batch,
                                     self.provider == "CUDAExecutionProvider")
                values = dict(zip(plan.outputs, shaped))
            for key, value in plan.reduce(values).items():
                full = np.zeros((count, *value.shape[1:]), value.dtype)
                if len(inputs):
                    full[ok] = value
                result[key] = full
        elif plan.kind == "patches":
            channels = np.asarray(plan.channels, np.int64)
            maxima = np.zeros((count, len(channels)), np.float32)
            positions = np.zeros((count, len(channels)), np.int64)
            if len(inputs):
                maxima[ok], positions[ok] = channel_maxima(
                    acts.channels_first(values[plan.layer], plan.layout, plan.axis), channels)
            result.update(values=maxima, positions=positions)
        else:
            side, real = plan.side, len(inputs)
            codes = values[plan.layer].reshape(real, -1) if real else np.zeros((0, 0), np.float32)
            code = np.zeros((count, codes.shape[1] if real else 1), np.float32)
            thumbs = np.zeros((count, side, side, 3), np.uint8)
            predicted = np.zeros(count, np.int64)
            if real:
                code[ok] = codes
                thumbs[ok] = np.stack([thumbnail(render.display_image(x, plan.config), side) for x in inputs])
                predicted[ok] = values[plan.config.logits_output].reshape(real, -1).argmax(axis=1)
            result.update(code=code, thumbnail=thumbs, predicted=predicted)
        return result


# -- on the driver -------------------------------------------------------------------------------------
class _InOrder:
    """Takes batches in any order, each scan index once, and hands them on in index order: runs of
    readable rows to ``deliver``, unreadable ones to ``on_failure``. ``done``: images handed on so far."""

    PASSED = ("index", "ok", "reason", "provider")

    def __init__(self, total: int, deliver, on_failure, ids: dict[int, str]):
        self.seen = np.zeros(total, bool)
        self.waiting: dict[int, tuple[dict, int]] = {}   # index -> (batch, row), not yet handed on
        self.done = 0
        self.deliver, self.on_failure, self.ids = deliver, on_failure, ids

    def push(self, batch: dict) -> int:
        """Take one batch; returns how many of its rows had been taken before (and were dropped)."""
        index = np.asarray(batch["index"], np.int64)
        fresh = ~self.seen[index]
        self.seen[index[fresh]] = True
        for row in np.flatnonzero(fresh):
            self.waiting[int(index[row])] = (batch, int(row))
        self._flush()
        return int((~fresh).sum())

    def _flush(self) -> None:
        run: list[tuple[dict, int]] = []
        indices: list[int] = []
        while self.done in self.waiting:
            batch, row = self.waiting.pop(self.done)
            if batch["ok"][row]:
                run.append((batch, row))
                indices.append(self.done)
            else:
                self._send(indices, run)
                run, indices = [], []
                self.on_failure(ItemFailure(self.done, self.ids[self.done], str(batch["reason"][row])))
            self.done += 1
        self._send(indices, run)

    def _send(self, indices: list[int], run: list[tuple[dict, int]]) -> None:
        if not run:
            return
        keys = [key for key in run[0][0] if key not in self.PASSED]
        self.deliver(indices, {key: np.stack([batch[key][row] for batch, row in run]) for key in keys})

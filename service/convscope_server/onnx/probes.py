"""Probe sessions: the original graph with requested tensors added as graph outputs.

Exposing a tensor stops onnxruntime from fusing across it, so probes are separate sessions, built on
demand and cached by the set of tensors they expose; the prediction session never changes. The tensors
are added to the original (shape-inferred) graph, so their names are exactly those Describe lists.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import onnx

from convscope_server.onnx.session import SessionSettings, create_session


def with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph outputs also include ``names`` (typed from shape inference)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    present = {o.name for o in exposed.graph.output}
    typed = {v.name: v for v in list(exposed.graph.value_info) + list(exposed.graph.input)}
    for name in names:
        if name in present:
            continue
        if name in typed:
            exposed.graph.output.append(typed[name])
        else:  # untyped tensor: onnxruntime infers the type
            exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        present.add(name)
    return exposed


class SessionPool:
    """Probe sessions of every model under one bound: each holds its own copy of the model's weights (and
    its optimised graph), so a server with many models must not keep a few per model. Least recently used
    first out; a request still running on an evicted session finishes with it."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._sessions: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, build):
        with self._lock:
            if key in self._sessions:
                self._sessions.move_to_end(key)
                return self._sessions[key]
        # Built outside the lock: a slow build for one request does not stall probes of others.
        session = build()
        with self._lock:
            self._sessions[key] = session
            self._sessions.move_to_end(key)
            while len(self._sessions) > max(1, self.capacity):
                self._sessions.popitem(last=False)
        return session

    def count(self, owner) -> int:
        with self._lock:
            return sum(1 for key in self._sessions if key[0] is owner)

    def drop(self, owner) -> None:
        """Forget every session of ``owner`` (a model replaced or removed by a reload)."""
        with self._lock:
            for key in [key for key in self._sessions if key[0] is owner]:
                del self._sessions[key]


# One pool per process (--max-probe-sessions): memory is the process's, whatever serves from it.
SESSIONS = SessionPool()


def measure_shapes(proto: onnx.ModelProto, names: list[str], input_name: str, sample: np.ndarray,
                   threads: int = 0) -> dict[str, tuple[int, ...]]:
    """The shapes of ``names`` in one run of ``proto`` on ``sample``: for the tensors whose shapes only
    exist at run time (a Reshape to a shape computed from Shape / Gather). A one-off at load, on the CPU
    with basic graph optimisation; the values are dropped as soon as their shapes are read."""
    settings = SessionSettings("cpu", threads)
    session = create_session(with_outputs(proto, names).SerializeToString(), settings, optimize=False)
    outputs = session.run(names, {input_name: sample})
    return {name: tuple(int(d) for d in np.shape(value)) for name, value in zip(names, outputs)}


class ProbeCache:
    """The probe sessions of one model, kept in the process-wide :data:`SESSIONS` pool."""

    def __init__(self, proto: onnx.ModelProto, settings: SessionSettings, pool: SessionPool | None = None):
        self._proto = proto
        self._settings = settings
        self._pool = pool or SESSIONS

    def session(self, names) -> object:
        key = frozenset(names)
        return self._pool.get((self, key), lambda: create_session(
            with_outputs(self._proto, sorted(key)).SerializeToString(), self._settings))

    def __len__(self) -> int:
        return self._pool.count(self)

    def clear(self) -> None:
        """Drop this model's sessions from the pool (their weights are freed once no request holds them)."""
        self._pool.drop(self)

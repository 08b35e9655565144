"""Probe sessions: the original graph with requested tensors added as graph outputs.

Exposing a tensor stops onnxruntime from fusing across it, so probes are separate sessions, built on
demand and cached by the set of tensors they expose; the prediction session never changes. The tensors
are added to the original (shape-inferred) graph, so their names are exactly those Describe lists.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

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


class ProbeCache:
    """Up to ``capacity`` probe sessions for one model, least recently used evicted first."""

    def __init__(self, proto: onnx.ModelProto, settings: SessionSettings, capacity: int = 8):
        self._proto = proto
        self._settings = settings
        self._capacity = capacity
        self._sessions: OrderedDict[frozenset, object] = OrderedDict()
        self._lock = threading.Lock()

    def session(self, names) -> object:
        key = frozenset(names)
        with self._lock:
            if key in self._sessions:
                self._sessions.move_to_end(key)
                return self._sessions[key]
        # Built outside the lock: a slow build for one request does not stall probes of others.
        session = create_session(with_outputs(self._proto, sorted(key)).SerializeToString(), self._settings)
        with self._lock:
            self._sessions[key] = session
            self._sessions.move_to_end(key)
            while len(self._sessions) > self._capacity:
                self._sessions.popitem(last=False)
        return session

    def __len__(self) -> int:
        return len(self._sessions)

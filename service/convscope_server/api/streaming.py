"""Run a long technique while streaming its progress; stop it when the call is cancelled or times out."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from convscope_server.errors import ResourceExhausted, Unavailable

# Jobs run on long-lived threads: a thread that is new for every job pays again for what torch and the
# math libraries keep per thread (an OpenMP team on the CPU, cuDNN/cuBLAS handles on a GPU). Measured on
# the 2-core CPU machine, a vanilla saliency of efficientnet_lite0 took 0.10-0.12 s on a new thread each
# time and 0.07-0.08 s on a reused one. At most one job per request thread runs at once, so the pool never
# makes a job wait as long as it has as many threads as the server has workers.
_JOB_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="convscope-job")
_running = 0
_running_changed = threading.Condition()
_stopping = threading.Event()  # set once when the process begins to shut down: every job stops


def running_jobs() -> int:
    """How many streamed jobs are still working (a cancelled one until it has noticed and returned)."""
    return _running


def begin_shutdown() -> None:
    """Stop every running job at its next check and refuse new ones (UNAVAILABLE). Process-wide and final:
    call it only when the process is about to exit."""
    _stopping.set()
    with _running_changed:
        _running_changed.notify_all()


def wait_for_jobs(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for every job thread to return; True when none is left."""
    with _running_changed:
        return _running_changed.wait_for(lambda: _running == 0, timeout=max(0.0, timeout))


class JobGate:
    """Admission for heavy jobs: ``running`` at once, ``queued`` more waiting at most ``wait_seconds`` each
    for a slot; anything beyond answers RESOURCE_EXHAUSTED at once. A slot is held until the job's thread
    returns (a cancelled job keeps it until it has noticed)."""

    def __init__(self, running: int, queued: int, wait_seconds: float):
        self.running, self.queued, self.wait_seconds = running, queued, wait_seconds
        self._active = self._waiting = 0
        self._changed = threading.Condition()

    def enter(self) -> None:
        with self._changed:
            if self._active >= self.running and self._waiting >= self.queued:
                raise ResourceExhausted(
                    f"the server is busy: {self._active} heavy jobs running and {self._waiting} queued, the "
                    f"limits set by --max-concurrent-jobs ({self.running}) and --max-queued-jobs "
                    f"({self.queued}); retry later")
            self._waiting += 1
            try:
                free = self._changed.wait_for(lambda: self._active < self.running or _stopping.is_set(),
                                              timeout=self.wait_seconds)
            finally:
                self._waiting -= 1
            if _stopping.is_set():
                raise Unavailable("the server is shutting down; retry on another server or later")
            if not free:
                raise ResourceExhausted(
                    f"the server is busy: no heavy-job slot came free within {self.wait_seconds:g} s "
                    f"(--queue-seconds; {self.running} running, --max-concurrent-jobs); retry later")
            self._active += 1

    def leave(self) -> None:
        with self._changed:
            self._active -= 1
            self._changed.notify()


_UNLIMITED = JobGate(running=1 << 30, queued=0, wait_seconds=0.0)
_current = threading.local()  # the gate of the server whose request thread this is


def use_gate(gate: JobGate) -> None:
    """Make ``gate`` the one jobs started on this thread pass (the server's ErrorInterceptor calls it at
    the start of every call, so servers in one process keep their own limits)."""
    _current.gate = gate


def stream_job(context, work, max_seconds: float | None = None, emits: bool = False):
    """Run ``work(progress, should_stop)`` in a worker thread and yield ("progress", (step, total, stage,
    loss, preview_png)) events while it runs, then ("result", value). ``should_stop()`` turns true when the
    client cancels, the deadline passes, the response stream is closed, or the job has run ``max_seconds``;
    the work checks it between batches. A job stopped by ``max_seconds`` answers RESOURCE_EXHAUSTED. With ``emits`` the work
    is called as ``work(progress, should_stop, emit)`` and ``emit(kind, value)`` yields events of its own
    (dataset scans report unreadable items this way)."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    started = time.monotonic()
    overtime = threading.Event()

    def should_stop() -> bool:
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            overtime.set()
        return stop.is_set() or overtime.is_set() or _stopping.is_set() or not context.is_active()

    def progress(step: int, total: int, stage: str = "", loss: float = 0.0, preview: bytes = b"") -> None:
        events.put(("progress", (step, total, stage, loss, preview)))

    def emit(kind: str, value) -> None:
        events.put((kind, value))

    def run() -> None:
        global _running
        try:
            events.put(("result", work(progress, should_stop, emit) if emits else work(progress, should_stop)))
        except BaseException as error:  # handed to the RPC thread, which re-raises it
            events.put(("error", error))
        finally:
            gate.leave()
            with _running_changed:
                _running -= 1
                _running_changed.notify_all()

    global _running
    if _stopping.is_set():
        raise Unavailable("the server is shutting down; retry on another server or later")
    gate = getattr(_current, "gate", _UNLIMITED)
    gate.enter()
    with _running_changed:
        _running += 1
    try:
        _JOB_THREADS.submit(run)
    except BaseException:
        gate.leave()
        with _running_changed:
            _running -= 1
        raise
    try:
        while True:
            try:
                kind, value = events.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if kind == "error":
                raise value
            if kind == "result" and value is None and overtime.is_set():
                raise ResourceExhausted(f"the job ran past the server's limit of {max_seconds:g} s and was stopped")
            if kind == "result" and value is None and _stopping.is_set():
                raise Unavailable("the server is shutting down and stopped the job; retry later")
            yield kind, value
            if kind == "result":
                return
    finally:
        stop.set()

"""Run a long technique while streaming its progress; stop it when the call is cancelled or times out."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from convscope_server.errors import ResourceExhausted

# Jobs run on long-lived threads: a thread that is new for every job pays again for what torch and the
# math libraries keep per thread (an OpenMP team on the CPU, cuDNN/cuBLAS handles on a GPU). Measured on
# the 2-core CPU machine, a vanilla saliency of efficientnet_lite0 took 0.10-0.12 s on a new thread each
# time and 0.07-0.08 s on a reused one. At most one job per request thread runs at once, so the pool never
# makes a job wait as long as it has as many threads as the server has workers.
_JOB_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="convscope-job")
_running = 0
_running_lock = threading.Lock()


def running_jobs() -> int:
    """How many streamed jobs are still working (a cancelled one until it has noticed and returned)."""
    return _running


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
        return stop.is_set() or overtime.is_set() or not context.is_active()

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
            with _running_lock:
                _running -= 1

    global _running
    with _running_lock:
        _running += 1
    _JOB_THREADS.submit(run)
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
            yield kind, value
            if kind == "result":
                return
    finally:
        stop.set()

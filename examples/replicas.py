"""Several convscope server replicas behind gRPC's own client-side load balancing.

Starts ``--replicas`` real server processes on loopback ports, connects one client to all of them with
an ``ipv4:`` target and the ``round_robin`` policy, and shows where calls land; then stops one replica
with SIGTERM (as an orchestrator would) and shows the others taking every call. No proxy is involved:
the client's channel keeps a connection to each address and picks the next ready one per call.

    .venv/bin/python examples/replicas.py [--replicas 2] [--calls 12] [--repository models]

Each replica gets its own data root holding one folder named after it, so ``Client.datasets()`` tells
which replica answered. In production the replicas share the model repository, the data root and the
gallery root (galleries are safe to share, see galleries.py), and the target is ``dns:///NAME:50051``
for a name that resolves to every replica (a Kubernetes headless service, ``docker compose --scale``).
Exits 0 when every call succeeded, every replica took calls, and only the survivors did after the stop.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_replica(index: int, repository: Path, scratch: Path) -> tuple[subprocess.Popen, int]:
    """One ``convscope-server`` process on a free loopback port; returns it and its port."""
    data = scratch / f"data-{index}"
    (data / f"replica-{index}").mkdir(parents=True)
    command = [sys.executable, "-m", "convscope_server.app", "--host", "127.0.0.1", "--port", "0",
               "--repository", str(repository), "--data-root", str(data), "--gallery-root", str(scratch / "galleries"),
               "--audit-root", str(scratch / "audits"), "--gradient-warmup", "false", "--log-level", "WARNING"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:  # the server prints its port once it listens
        found = re.search(r"listening on \S+:(\d+)", line)
        if found:
            return process, int(found.group(1))
    raise SystemExit(f"replica {index} did not start (exit {process.wait()})")


def replica_of(client) -> str:
    """Which replica answered one call (each lists the one folder of its own data root)."""
    return client.datasets()[0].name


def spread(client, calls: int) -> collections.Counter:
    return collections.Counter(replica_of(client) for _ in range(calls))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--calls", type=int, default=12, help="calls before and after stopping a replica")
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "clients"))
    from convscope import Client

    with tempfile.TemporaryDirectory(prefix="convscope-replicas-") as scratch:
        replicas = [start_replica(i, args.repository, Path(scratch)) for i in range(args.replicas)]
        try:
            target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for _, port in replicas)
            print(f"target {target}, load balancing round_robin")
            with Client(target, load_balancing="round_robin", timeout=30) as client:
                client.wait_ready(30)
                time.sleep(0.5)  # round_robin connects to every address; let them all become ready
                before = spread(client, args.calls)
                print(f"{args.calls} calls over {args.replicas} replicas: {dict(sorted(before.items()))}")
                stopped, _ = replicas[0]
                stopped.send_signal(signal.SIGTERM)
                code = stopped.wait(30)
                print(f"replica-0 stopped (SIGTERM, exit {code})")
                after = spread(client, args.calls)
                print(f"{args.calls} calls after the stop: {dict(sorted(after.items()))}")
        finally:
            for process, _ in replicas:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process, _ in replicas:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
    every = {f"replica-{i}" for i in range(args.replicas)}
    ok = set(before) == every and "replica-0" not in after and sum(after.values()) == args.calls
    print("ok: every replica took calls, the survivors took all of them after the stop" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

"""Replicated serving: server replicas behind gRPC's client-side load balancing (round_robin over an
``ipv4:`` target) share the calls, and the others take the load when one stops. Real servers, real client."""

from __future__ import annotations

import collections
import subprocess
import sys

import numpy as np
import pytest

from convscope import Client
from conftest import ROOT, png_bytes, start


def replica_of(client) -> str:
    """The replica that answered: each one's data root holds one folder named after it."""
    return client.datasets()[0].name


@pytest.fixture()
def replicas(repository, tmp_path):
    running = []
    for name in ("replica-a", "replica-b"):
        (tmp_path / name / name).mkdir(parents=True)
        running.append(start(repository, data_root=tmp_path / name, gallery_root=tmp_path / "galleries"))
    yield running
    for server in running:
        server.stop(0)


def test_round_robin_spreads_calls_and_a_stopped_replica_leaves_the_rest_to_the_other(replicas):
    a, b = replicas
    target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
    with Client(target) as first:   # gRPC's default policy, pick_first: every call to one replica
        assert len(collections.Counter(replica_of(first) for _ in range(8))) == 1
    with Client(target, load_balancing="round_robin", timeout=30) as client:
        client.wait_ready(10)
        seen = collections.Counter(replica_of(client) for _ in range(20))
        assert set(seen) == {"replica-a", "replica-b"} and min(seen.values()) >= 5, seen
        a.stop(0.5)
        after = collections.Counter(replica_of(client) for _ in range(10))
        assert after == {"replica-b": 10}
        images = [png_bytes(np.full((32, 32, 3), v, np.uint8)) for v in (20, 120, 220)]
        scan = client.top_patches("tiny", "/conv3/Conv_output_0", images, k=2)   # a streamed job, too
        assert scan.images == 3 and not scan.errors


def test_the_replicas_example_runs(tmp_path):
    """examples/replicas.py: three server processes, SIGTERM to one, the client never sees an error."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "replicas.py"), "--replicas", "3", "--calls", "9"],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: every replica took calls" in done.stdout
    assert "'replica-0'" not in done.stdout.split("after the stop")[1]

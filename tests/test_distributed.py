"""Dataset scans on a Ray cluster (issue 15): the same result as the single-machine scan, with a worker
killed mid-scan too; cancelling leaves the cluster idle; placement errors name the field.

One local Ray cluster for the module (2 CPUs, its node on the loopback, token authentication with a token
made for the run and kept out of ~/.ray), started and stopped here; the servers are real in-process ones
driving it (``--ray auto`` finds this process's connection), called through the real client.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from convscope import Client, FailedPrecondition, InvalidArgument
from conftest import png_bytes, start

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="Ray is not installed (the distributed extra: pip install '.[distributed]')"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")]

MODEL = "efficientnet_lite0"
LITE0_BLOCK3 = "/_blocks.3/Clip_1_output_0"   # ReLU6 output: many exact ties at 6.0
GOOD = 298          # readable images in many/; with the three unreadable files a scan covers 301
UNREADABLE = ["b/0100x_corrupt.jpg", "c/0200x_truncated.png", "c/0201x_escape.png"]


def children(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        found += kids
        frontier += kids
    return found


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def ray_processes() -> list[int]:
    return [p for p in children(os.getpid()) if "ray" in command(p) or "gcs_server" in command(p)]


def process_limits() -> str:
    """This process's threads, open files and limits: what a node that cannot start may have run into."""
    import resource

    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    threads = next((line.split()[1] for line in status.splitlines() if line.startswith("Threads:")), "?")
    files = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").exists() else "?"
    limits = {name: resource.getrlimit(getattr(resource, f"RLIMIT_{name}"))[0] for name in ("NPROC", "NOFILE", "AS")}
    return f"the test process: {threads} threads, {files} open files; limits {limits}"


def start_head(temp: str) -> tuple[subprocess.Popen | None, str, str]:
    """A Ray head (2 CPUs, node on the loopback, 256 MiB object store) started by ``ray start --block`` in its
    own process group: (the process, its address, "") once it accepts drivers, or (None, "", why not) after
    stopping what it started.

    Not ``ray.init()`` here: that forks the GCS and the raylet from this process, whose other threads (the
    in-process servers of earlier tests, onnxruntime, torch) may hold a lock at the fork; Ray's preexec_fn
    then runs Python in the child and can hang there before exec (seen once in CI: a raylet that never
    wrote a log line). ``ray start`` forks them from a fresh single-threaded process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = Path(temp) / "ray-start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
             "--num-cpus=2", "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
             f"--object-store-memory={256 << 20}", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and head.poll() is None:
        if "Ray runtime started" in log_path.read_text(errors="replace"):
            return head, f"127.0.0.1:{port}", ""
        time.sleep(0.25)
    code = head.poll()
    stop_head(head)
    text = log_path.read_text(errors="replace").strip()
    state = f"exited with {code}" if code is not None else "still starting after 120 s"
    return None, "", f"`ray start --head` {state}; it printed: {text[-1500:]!r}; {process_limits()}"


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM (Ray drains and stops the node's processes), then SIGKILL to the group if it lingers."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=40)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for this module: 2 CPUs, loopback node address, a throw-away auth token, its
    session files in a short temporary folder under /tmp (Unix socket paths are at most 107 bytes); this
    process joins it as the driver. Stopped at the end with no process of it left.

    A head that does not come up is started once more. Where it fails twice the module is skipped with
    what ``ray start`` printed in the reason (CONVSCOPE_REQUIRE_RAY=1 makes that a failure): a Ray that
    cannot start a node on this machine is an environment's limit, like a missing GPU, and the reason
    says which."""
    temps, reasons, head = [], [], None
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # node address 127.0.0.1
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
        import ray

        for _attempt in range(2):
            temps.append(tempfile.mkdtemp(prefix="cs-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
            head, address, reason = start_head(temps[-1])
            if head is not None:
                break
            reasons.append(reason)
            print(f"\nthe local Ray head did not start: {reason}", file=sys.stderr)
        if head is None:
            for temp in temps:
                shutil.rmtree(temp, ignore_errors=True)
            message = "a local Ray head did not start, twice: " + " | second try: ".join(reasons)
            if os.environ.get("CONVSCOPE_REQUIRE_RAY") == "1":
                pytest.fail(message)
            pytest.skip(message)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
            yield ray
        finally:
            started = ray_processes()   # GCS, raylet, workers: they outlive their parents only as zombies
            ray.shutdown()
            stop_head(head)
            deadline = time.monotonic() + 20
            while [p for p in started if running(p)] and time.monotonic() < deadline:
                time.sleep(0.2)
            left = [command(p) for p in started if running(p)]
            for temp in temps:
                shutil.rmtree(temp, ignore_errors=True)
            assert not left, f"Ray processes left behind: {left}"


def blocky(rng, size: int) -> np.ndarray:
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return coarse.repeat(8, axis=0).repeat(8, axis=1)


@pytest.fixture(scope="module")
def scan_root(tmp_path_factory, data_root) -> Path:
    """A data root with ``many/``: 298 images in 3 label folders (PNG and JPEG, 32-96 px), a corrupt JPEG, a
    truncated PNG and a symlink leading out of the root, in the middle of the scan order."""
    root = tmp_path_factory.mktemp("ray-data")
    rng = np.random.default_rng(15)
    names = []
    for n in range(GOOD):
        names.append(f"{['a', 'b', 'c'][n % 3]}/{n:04d}.{'png' if n % 2 else 'jpg'}")
    folder = root / "many"
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = blocky(rng, int(rng.choice([32, 64, 96])))
        if name.endswith(".png"):
            (folder / name).write_bytes(png_bytes(pixels))
        else:
            from PIL import Image

            Image.fromarray(pixels).save(folder / name, quality=90)
    (folder / "b" / "0100x_corrupt.jpg").write_bytes(b"this is not a jpeg")
    good = png_bytes(blocky(rng, 32))
    (folder / "c" / "0200x_truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "c" / "0201x_escape.png").symlink_to(data_root / "broken" / "a_good.png")
    return root


@pytest.fixture(scope="module")
def gallery_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-galleries")


@pytest.fixture(scope="module")
def cluster_server(ray_cluster, repository, scan_root, gallery_root):
    """A server whose dataset-folder scans run on the cluster by default (--ray auto --ray-by-default)."""
    running = start(repository, data_root=scan_root, gallery_root=gallery_root, ray="auto", ray_by_default=True)
    assert running.cluster is not None and not running.cluster.owned  # the module's cluster, not its own
    with Client(running.address, timeout=300) as c:
        yield c
    running.stop(0)


@pytest.fixture(scope="module")
def local_patches(cluster_server):
    """The single-machine scan every cluster scan is compared with."""
    return cluster_server.top_patches(MODEL, LITE0_BLOCK3, dataset="many", k=6, patches=True, render=True,
                                      placement="server")


def same_errors(ours, reference) -> bool:
    return [(e.index, e.id, e.reason) for e in ours] == [(e.index, e.id, e.reason) for e in reference]


def assert_same_patches(ours, reference):
    assert (ours.layer, ours.images, ours.skipped, ours.execution_provider) == \
        (reference.layer, reference.images, reference.skipped, reference.execution_provider)
    assert same_errors(ours.errors, reference.errors)
    assert ours.grid_channels == reference.grid_channels and ours.grid_png == reference.grid_png
    assert list(ours.channels) == list(reference.channels)
    for channel, hits in reference.channels.items():
        got = ours.channels[channel]
        assert [(h.index, h.id, h.value, h.row, h.col, h.box) for h in got] == \
            [(h.index, h.id, h.value, h.row, h.col, h.box) for h in hits], f"channel {channel}"
        assert all(np.array_equal(a.patch, b.patch) for a, b in zip(got, hits))


def test_a_cluster_scan_equals_the_single_machine_scan(cluster_server, local_patches):
    events = []
    scan = cluster_server.top_patches(MODEL, LITE0_BLOCK3, dataset="many", k=6, patches=True, render=True,
                                      progress=lambda *event: events.append(event))
    assert scan.placement == "cluster" and local_patches.placement == "server"   # --ray-by-default
    assert_same_patches(scan, local_patches)
    assert scan.images == GOOD and scan.skipped == 3   # the symlink out is refused like the broken files
    assert [e.id for e in scan.errors] == UNREADABLE
    assert [e.index for e in scan.errors] == sorted(e.index for e in scan.errors)
    # ties at ReLU6's 6.0 are broken by scan order, as locally
    tied = [hits for hits in scan.channels.values() if len({h.value for h in hits}) < len(hits)]
    assert tied and all([h.index for h in hits if h.value == hits[0].value] ==
                        sorted(h.index for h in hits if h.value == hits[0].value) for hits in tied)
    scanning = [step for step, total, stage in events if stage == "scanning on the Ray cluster"]
    assert scanning == sorted(scanning) and scanning[-1] == GOOD + 3
    assert any(stage.startswith("starting 2 Ray actors") for _, _, stage in events)


def test_a_worker_killed_mid_scan_changes_nothing(cluster_server, local_patches):
    killed = []

    def kill_one_actor(step, total, stage):
        if killed or stage != "scanning on the Ray cluster":
            return
        actors = [p for p in children(os.getpid()) if command(p).startswith("ray::MapWorker")]
        assert actors, "no Ray actor process found"
        os.kill(actors[0], signal.SIGKILL)
        killed.append((actors[0], step, total))

    scan = cluster_server.top_patches(MODEL, LITE0_BLOCK3, dataset="many", k=6, patches=True, render=True,
                                      placement="cluster", progress=kill_one_actor)
    assert killed and killed[0][1] < killed[0][2] / 2, "the actor was not killed mid-scan"
    assert not Path(f"/proc/{killed[0][0]}").exists()
    assert_same_patches(scan, local_patches)


def cluster_idle(ray) -> bool:
    return ray.available_resources().get("CPU", 0) == ray.cluster_resources().get("CPU", 0)


def test_cancelling_a_cluster_scan_leaves_the_cluster_idle(cluster_server, ray_cluster):
    from convscope_server.api.streaming import running_jobs

    def stop(step, total, stage):
        if stage == "scanning on the Ray cluster" and step >= 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cluster_server.top_patches(MODEL, LITE0_BLOCK3, dataset="many", k=6, placement="cluster", progress=stop)
    deadline = time.monotonic() + 30
    while (running_jobs() or not cluster_idle(ray_cluster)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_jobs() == 0
    assert cluster_idle(ray_cluster), f"still in use: {ray_cluster.available_resources()}"
    assert not [p for p in children(os.getpid()) if command(p).startswith("ray::MapWorker") and running(p)]


def test_a_cluster_gallery_equals_the_single_machine_gallery(cluster_server, gallery_root):
    from convscope_server.galleries import read_gallery

    built = {}
    for placement in ("server", "cluster"):
        stages = []
        built[placement] = cluster_server.build_gallery(f"many-{placement}", "tiny", dataset="many",
                                                        placement=placement,
                                                        progress=lambda step, total, stage: stages.append(stage))
        assert any("Ray cluster" in s for s in stages) == (placement == "cluster")
    local, remote = built["server"], built["cluster"]
    assert local.size == remote.size == GOOD and same_errors(local.errors, remote.errors) and remote.ready
    assert [e.id for e in remote.errors] == UNREADABLE
    a, b = (read_gallery(gallery_root / f"many-{p}.gallery", f"many-{p}") for p in ("server", "cluster"))
    assert a.ids == b.ids and a.labels == b.labels and a.predicted == b.predicted
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.thumbnails, b.thumbnails)
    found = cluster_server.nearest_neighbors("many-cluster", png_bytes(np.asarray(a.thumbnails[5])), k=4)
    assert found == cluster_server.nearest_neighbors("many-server", png_bytes(np.asarray(a.thumbnails[5])), k=4)


def test_placement_errors_name_the_field(cluster_server, client):
    with pytest.raises(FailedPrecondition, match=r"spec\.source\.placement: .*has none.*--ray"):
        client.top_patches("tiny", "/conv3/Conv_output_0", dataset="demo", placement="cluster")
    with pytest.raises(InvalidArgument, match=r"spec\.source\.placement: .*dataset folders"):
        cluster_server.top_patches("tiny", "/conv3/Conv_output_0", [png_bytes(np.zeros((32, 32, 3), np.uint8))],
                                   placement="cluster")
    # streamed images follow the server default to this server; both servers keep serving
    images = [png_bytes(np.full((32, 32, 3), v, np.uint8)) for v in (10, 200)]
    assert cluster_server.top_patches("tiny", "/conv3/Conv_output_0", images, k=1).placement == "server"
    assert client.top_patches("tiny", "/conv3/Conv_output_0", dataset="demo", k=1).placement == "server"
    with pytest.raises(FailedPrecondition, match=r"spec\.source\.placement: .*has none"):  # audits too
        client.run_audit("nowhere", "tiny", dataset="demo", placement="cluster")
    with pytest.raises(InvalidArgument, match=r"spec\.source\.placement: .*dataset folders"):
        cluster_server.run_audit("streamed", "tiny", [png_bytes(np.zeros((32, 32, 3), np.uint8))],
                                 placement="cluster")


@pytest.mark.parametrize("settings, flag", [({"ray_by_default": True}, "--ray-by-default"),
                                             ({"ray": "local", "ray_actors": -1}, "--ray-actors")])
def test_ray_flags_are_checked_at_start_up(repository, settings, flag):
    with pytest.raises(ValueError, match=flag):
        start(repository, **settings)


def test_the_cli_scans_on_the_cluster(cluster_server, tmp_path, capsys):
    from convscope.cli import main

    base = ["--server", cluster_server.target]
    assert main(base + ["patches", "tiny", "/conv3/Conv_output_0", "--dataset", "many", "--placement", "cluster",
                        "--k", "2", "--rows", "2", "--out", str(tmp_path / "patches")]) == 0
    out = capsys.readouterr().out
    assert f"{GOOD} images scanned, 3 skipped" in out and "on the Ray cluster" in out
    (tmp_path / "one.png").write_bytes(png_bytes(np.zeros((32, 32, 3), np.uint8)))
    assert main(base + ["patches", "tiny", "/conv3/Conv_output_0", str(tmp_path / "one.png"), "--placement",
                        "cluster", "--out", str(tmp_path / "streamed")]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert main(base + ["audit", "tiny", "--dataset", "many", "--placement", "cluster", "--name", "cli-cluster",
                        "--overwrite", "--unit-layers", "1", "--attribution-images", "1", "--curve-steps", "2",
                        "--robustness-images", "2", "--method", "vanilla", "--feature-steps", "-1",
                        "--worst-images", "-1", "--out", str(tmp_path / "audit")]) == 0
    assert f"audit cli-cluster: {GOOD} images" in capsys.readouterr().out
    assert (tmp_path / "audit" / "index.html").is_file()


@contextlib.contextmanager
def server_process(repository: Path, scan_root: Path, tmp_path: Path, *ray_flags: str):
    """`convscope-server ... --ray ...` as deployed, in a process of its own: yields (the process, a client
    on its port, its listening line); killed if the test did not stop it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "convscope_server.app", "--port", "0", "--repository", str(repository),
         "--data-root", str(scan_root), "--gallery-root", str(tmp_path / "galleries"), "--audit-root",
         str(tmp_path / "audits"), "--gradient-warmup", "false", "--log-level", "WARNING", *ray_flags],
        stdout=subprocess.PIPE, stderr=(tmp_path / "server.log").open("w"), text=True)
    try:
        line = process.stdout.readline()
        found = re.search(r"listening on \S+:(\d+)", line)
        assert found, line + (tmp_path / "server.log").read_text()
        with Client(f"localhost:{found.group(1)}", timeout=300) as client:
            yield process, client, line
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def assert_cluster_scan_equals_the_server_scan(client, server_client, **placement):
    """The patch scan of many/ by ``client`` (a server process) ran on a cluster and equals the
    single-machine scan of the in-process server."""
    scan = client.top_patches("tiny", "/conv3/Conv_output_0", dataset="many", k=4, patches=True, **placement)
    reference = server_client.top_patches("tiny", "/conv3/Conv_output_0", dataset="many", k=4, patches=True,
                                          placement="server")
    assert scan.placement == "cluster"
    assert_same_patches(scan, reference)


def test_a_server_process_joins_the_cluster_by_address(ray_cluster, cluster_server, repository, scan_root, tmp_path):
    """`convscope-server --ray HOST:PORT`: a separate process joining the running cluster as a driver; its
    scan equals the single-machine one, and SIGTERM leaves the cluster and exits 0."""
    address = ray_cluster.get_runtime_context().gcs_address
    with server_process(repository, scan_root, tmp_path, "--ray", address) as (process, joined, line):
        assert f"ray: {address}" in line
        assert_cluster_scan_equals_the_server_scan(joined, cluster_server, placement="cluster")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0


def test_a_server_with_its_own_local_cluster_scans_and_stops_it(cluster_server, repository, scan_root, tmp_path):
    """`convscope-server --ray local --ray-by-default`: the server starts a one-machine cluster of its own
    (not the module's, which is running: a new instance, never the last one started here), scans there
    by default with the single-machine result, and on SIGTERM stops every Ray process it started."""
    flags = ("--ray", "local", "--ray-by-default", "true", "--ray-actors", "1")
    with server_process(repository, scan_root, tmp_path, *flags) as (process, own, line):
        assert "ray: local" in line
        started = [p for p in children(process.pid) if "raylet" in command(p) or "gcs_server" in command(p)]
        assert len(started) >= 2, "the server started no Ray node of its own"
        assert_cluster_scan_equals_the_server_scan(own, cluster_server)   # by default, on its cluster
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        deadline = time.monotonic() + 30
        while [p for p in started if running(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [command(p) for p in started if running(p)]


def test_rows_are_handed_on_once_each_in_index_order_whatever_arrives():
    """The driver's merge order: batches out of order, a batch re-run after a worker died (rows again, split
    differently), failures between readable rows -> each index once, readable runs and failures in order."""
    from convscope_server.distributed import _InOrder

    def batch(indices, bad=()):
        indices = np.asarray(indices, np.int64)
        return {"index": indices, "ok": np.array([i not in bad for i in indices]),
                "reason": np.array([f"bad {i}" if i in bad else "" for i in indices], object),
                "provider": np.array(["CPUExecutionProvider"] * len(indices), object),
                "values": indices[:, None] * 10.0}

    delivered, failed = [], []
    merger = _InOrder(10, lambda indices, rows: delivered.append((indices, rows["values"][:, 0].tolist())),
                      failed.append, {i: f"id{i}" for i in range(10)})
    assert merger.push(batch([4, 5, 6], bad={5})) == 0 and merger.done == 0 and not delivered
    assert merger.push(batch([0, 1, 2, 3])) == 0 and merger.done == 7
    assert merger.push(batch([2, 3, 4, 5])) == 4          # a re-run: nothing counted twice
    assert merger.push(batch([5, 6, 7, 8, 9], bad={9})) == 2 and merger.done == 10
    assert delivered == [([0, 1, 2, 3, 4], [0.0, 10.0, 20.0, 30.0, 40.0]), ([6], [60.0]), ([7, 8], [70.0, 80.0])]
    assert [(f.index, f.id, f.reason) for f in failed] == [(5, "id5", "bad 5"), (9, "id9", "bad 9")]


def test_an_audit_scanned_on_the_cluster_equals_the_audit_scanned_here(cluster_server):
    """The audit's scan stage on the cluster (predictions, codes, unit statistics, top images, label means,
    worst images): the whole report equals the one whose scan ran on the server, but for timings."""
    budget = {"unit_layers": 2, "attribution_images": 2, "curve_steps": 2, "robustness_images": 4,
              "methods": ["vanilla"], "feature_steps": 2, "worst_images": 3,
              "label_map": {"a": 1, "b": 2, "c": [3, 4]}}
    reports = {}
    stages = []
    for placement in ("server", "cluster"):
        info = cluster_server.run_audit(f"audit-{placement}", "tiny", dataset="many", placement=placement,
                                        overwrite=True, progress=lambda step, total, stage: stages.append(stage),
                                        **budget)
        assert info.images == GOOD
        reports[placement] = cluster_server.audit(f"audit-{placement}")
    assert any(stage.startswith("starting 2 Ray actors") for stage in stages)
    for report in reports.values():
        del report["stage_seconds"], report["created"], report["model"]["timing"]
    assert [s["id"] for s in reports["cluster"]["dataset"]["skipped"]] == UNREADABLE
    assert reports["cluster"]["units"] and reports["cluster"]["classes"]["worst"]
    # openTSNE sums the KL divergence it reports on several threads: equal to ~1e-15, not bit for bit
    kl = [report["dataset"]["map"].pop("kl_divergence") for report in reports.values()]
    assert kl[0] == pytest.approx(kl[1], rel=1e-9)
    assert reports["cluster"] == reports["server"]

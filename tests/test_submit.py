"""`slime submit` against a real `ray start --head` on 127.0.0.1 (non-default ports, own temp dir).

The head runs as `ray start --block` in its own process group; teardown signals that group and then
any leftover process whose command line names this test's temp dir: only processes this test started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from jobs import cli
from pipelines.lifecycle import jobs_client

pytestmark = pytest.mark.integration
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
              "--node-manager-port", "--object-manager-port")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_using(marker: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            continue
    return [p for p in out if p != os.getpid()]


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="slr", dir="/tmp")  # short: unix socket paths are limited to 107 bytes
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    # Job entrypoints run `python -m jobs.X`: the head's PATH must find this interpreter first.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
           "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           "--object-store-memory=200000000", *[f"{k}={v}" for k, v in ports.items()]]
    t0 = time.monotonic()
    head = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        jobs_client.connect(address, timeout_s=60)
        print(f"ray head ready in {time.monotonic() - t0:.1f} s")
        yield address
    finally:
        for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):  # `ray start --block` ignores SIGTERM for > 20 s
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                pass
            for pid in _pids_using(temp_dir):  # raylet/gcs/workers that left the group
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while (head.poll() is None or _pids_using(temp_dir)) and time.monotonic() < deadline:
                time.sleep(0.2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_follows_logs_and_returns_job_exit_code(ray_head, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.chdir(REPO)
    out_dir = tmp_path / "synth"
    t0 = time.monotonic()
    rc = cli.main(["submit", "synth", "--address", ray_head, "--working-dir", REPO, "--env", "SLIME_TEST_MARK=42",
                   "--", "--config", "jobs/configs/synth_tiny.yaml", "num_images=2", f"output_dir={out_dir}"])
    elapsed = time.monotonic() - t0
    out = capsys.readouterr().out
    print(f"submit round trip {elapsed:.1f} s")
    assert rc == 0, out
    job_id = out.split("submitted ", 1)[1].split()[0]
    assert f"job {job_id} SUCCEEDED" in out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("{")))  # the job's own stdout
    assert summary and os.path.exists(out_dir)

    assert cli.main(["status", job_id, "--address", ray_head]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert cli.main(["logs", job_id, "--address", ray_head]) == 0
    assert json.dumps(summary)[:40] in capsys.readouterr().out


def test_failing_job_exits_1(ray_head, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    rc = cli.main(["submit", "synth", "--address", ray_head, "--working-dir", REPO, "--",
                   "--config", "jobs/configs/synth_tiny.yaml", "no_such_key=1"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED" in out

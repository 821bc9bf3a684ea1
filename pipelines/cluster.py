"""A multi-node Ray cluster on one machine: a head plus N worker nodes, each a separate raylet with its own
temp dir, object store and resources (Ray's own ``ray.cluster_utils.Cluster``).

What it is for: tests and anyone trying slime-ray "as on a cluster" without one. Every worker node carries
``slime_worker: 1`` and its own ``slime_node_<i>: 1``, so ``scaling.resources_per_worker={CPU: 0.5,
slime_worker: 1}`` puts each Ray Train worker on its own node, and ``{slime_node_0: 0.5}`` pins work to one
node. The head has CPUs for the driver side (Train controller, Ray Data's coordinator, read tasks) and the
dashboard (Jobs API) on 127.0.0.1.

Everything the cluster writes (sessions, logs, spilled objects, the ``ray_current_cluster`` address file)
stays under its own root directory: ``RAY_TMPDIR`` points there while the nodes start, so a plain
``ray.init()`` elsewhere on the machine never joins this cluster by accident, and stopping it removes
only what it started (its nodes' processes, by the pids Ray recorded for them; never ``ray stop``).
Internal traffic uses the host's own address (Ray picks it even when asked for 127.0.0.1; it stays on
the machine); the dashboard binds 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Self

WORKER_RESOURCE = "slime_worker"  # one per worker node: a Train worker asking for 1 gets a node to itself


def node_resource(index: int) -> str:
    return f"slime_node_{index}"


@dataclass(frozen=True, kw_only=True)
class LocalClusterConfig:
    workers: int = 2
    head_cpus: int = 2  # logical: driver-side actors, Ray Data reads and actors (fractional requests)
    worker_cpus: int = 1  # logical, per worker node
    head_object_store_mb: int = 400
    worker_object_store_mb: int = 200
    dashboard_port: int = 0  # 0: a free port
    root: str | None = None  # None: a fresh directory under /tmp, removed by stop() (short: socket paths are limited)
    worker_resources: dict[str, float] = field(default_factory=dict)  # extra resources on every worker node
    # How soon the GCS declares a silent node dead (Ray's defaults: 3000 ms x 5). Until then a killed node still
    # offers its resources, and work placed there (a restarted run's data actors) fails a second time.
    health_check_period_ms: int = 1000
    health_check_failure_threshold: int = 10


class LocalCluster:
    """``with LocalCluster(cfg) as c: ray.init(address=c.address) ...``. ``kill_node(i)`` removes worker
    node ``i`` without grace (SIGKILL to its raylet, workers and agents: what a lost host looks like to
    Ray); ``add_worker()`` joins a fresh one (a replacement, as an autoscaler would provide)."""

    def __init__(self, cfg: LocalClusterConfig = LocalClusterConfig()):
        self.cfg = cfg
        self.head_args: dict | None = None  # what start() gave the head; restart() starts the new one with it
        self.dead_clusters: list = []  # ray.cluster_utils.Cluster objects whose head was killed (kept: their Nodes' atexit)
        self.root = cfg.root or tempfile.mkdtemp(prefix="slime-mn-", dir="/tmp")
        self.cluster = None
        self.nodes: dict[int, object] = {}  # worker index -> ray._private.node.Node (live ones)
        self.processes: dict[int, subprocess.Popen] = {}  # worker index -> `ray start --block` (its own session)
        self.process_node_ids: dict[int, str] = {}
        self._next = 0
        self._env: str | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        from ray.cluster_utils import Cluster

        os.makedirs(os.path.join(self.root, "ray"), exist_ok=True)  # where the address file goes
        self._env = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = self.root
        self.head_args = {
            "num_cpus": self.cfg.head_cpus, "temp_dir": os.path.join(self.root, "head"), "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": self.cfg.dashboard_port,
            # the head's agent serves the Jobs API's submissions; Ray's fixed default (52365) is taken by any
            # other Ray head on the machine ("No available agent to submit job")
            "dashboard_agent_listen_port": _free_port(),
            "object_store_memory": self.cfg.head_object_store_mb * 2**20, "resources": {"slime_head": 1},
            "_system_config": {"health_check_period_ms": self.cfg.health_check_period_ms,
                               "health_check_failure_threshold": self.cfg.health_check_failure_threshold}}
        self.cluster = Cluster(initialize_head=True, head_node_args=self.head_args)
        # a restarted head takes the same dashboard port (as a KubeRay head Service keeps its name)
        self.head_args["dashboard_port"] = int(self.cluster.webui_url.rsplit(":", 1)[1])
        for _ in range(self.cfg.workers):
            self.add_worker(wait=False)
        self.wait_for_nodes()
        return self

    def stop(self) -> None:
        """Every process this cluster started, by pid (Ray's Node objects hold them); then the env back."""
        for proc in self.processes.values():  # `ray start --block` stops its node's processes on SIGTERM
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.processes.clear()
        if self.cluster is not None and self.cluster in self.dead_clusters:  # head killed, no restart yet
            for index in list(self.nodes):
                self._kill_in_process_node(self.nodes.pop(index))
            self.cluster = None
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
            self.nodes.clear()
        if self.cfg.root is None:  # a directory it made itself (sessions, logs, spilled objects) goes too
            shutil.rmtree(self.root, ignore_errors=True)
        if self._env is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = self._env

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ nodes

    def add_worker(self, *, wait: bool = True) -> int:
        """A new worker node (index = next unused); returns its index. Off the main thread (a test's watcher
        adding a replacement while the driver trains) the node is a ``ray start --address ... --block``
        process, as a node an autoscaler launches would be: Ray's in-process node installs a SIGTERM
        handler, which Python allows only on the main thread."""
        index, self._next = self._next, self._next + 1
        resources = {WORKER_RESOURCE: 1, node_resource(index): 1, **self.cfg.worker_resources}
        if threading.current_thread() is not threading.main_thread():
            self._start_process_node(index, resources, wait=wait)
            return index
        node = self.cluster.add_node(
            wait=wait, num_cpus=self.cfg.worker_cpus, temp_dir=os.path.join(self.root, f"w{index}"),
            object_store_memory=self.cfg.worker_object_store_mb * 2**20,
            resources=resources)
        self.nodes[index] = node
        return index

    def _start_process_node(self, index: int, resources: dict, *, wait: bool, timeout: float = 120.0) -> None:
        import ray

        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]} if ray.is_initialized() else set()
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        log = os.path.join(self.root, f"w{index}.log")
        with open(log, "wb") as out:
            self.processes[index] = subprocess.Popen(
                [ray_cli if os.path.exists(ray_cli) else shutil.which("ray"), "start",
                 f"--address={self.address}", f"--num-cpus={self.cfg.worker_cpus}",
                 f"--resources={json.dumps(resources)}", f"--temp-dir={os.path.join(self.root, f'w{index}')}",
                 f"--object-store-memory={self.cfg.worker_object_store_mb * 2**20}", "--disable-usage-stats",
                 "--block"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while wait and ray.is_initialized():
            fresh = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before
                     and n["Resources"].get(node_resource(index))]
            if fresh:
                self.process_node_ids[index] = fresh[0]["NodeID"]
                return
            if self.processes[index].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker node {index} did not join; see {log}")
            time.sleep(0.5)

    def kill_node(self, index: int) -> float:
        """SIGKILL worker node ``index``'s processes (no graceful drain); returns the time it took."""
        start = time.monotonic()
        if index in self.processes:  # a `ray start` node: its whole session (raylet, workers, agents)
            proc = self.processes.pop(index)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.process_node_ids.pop(index, None)
        else:
            self.cluster.remove_node(self.nodes.pop(index), allow_graceful=False)
        return time.monotonic() - start

    # ------------------------------------------------------------------ the head

    def kill_head(self) -> float:
        """SIGKILL the head's processes, as a lost head host looks: GCS, raylet, dashboard, its agents, the
        log monitor and reaper (the pids Ray recorded), and every process the head's raylet started (its
        workers: a Ray Job's supervisor actor and the job's driver, the Train controller, ...), found as the
        descendants of those pids before anything is killed. Worker nodes are left as they are. Returns the
        seconds it took (until every one of those processes is gone)."""
        start = time.monotonic()
        self._kill_in_process_node(self.cluster.head_node)
        self.dead_clusters.append(self.cluster)
        return time.monotonic() - start

    @staticmethod
    def _kill_in_process_node(node) -> None:
        """SIGKILL a ray._private.node.Node's processes and their descendants; reap the ones this process started."""
        infos = [i for group in node.all_processes.values() for i in group if i.process is not None]
        _kill_tree([i.process.pid for i in infos])
        for info in infos:
            info.process.wait()

    def restart(self, timeout: float = 180.0) -> dict[str, float]:
        """A fresh head on the same dashboard port, then fresh worker nodes (as many as were live), as KubeRay
        recreates the head pod and then the worker pods. Kills the head first if it is still up.

        Without GCS fault tolerance a new head is a new cluster (new GCS, new cluster id): the old worker
        nodes cannot join it. Left alone, their raylets notice that the GCS is gone and exit by themselves
        after ``gcs_rpc_server_reconnect_timeout_s`` (60 s by default), with every worker (and actor, and
        object) they held; so they are killed here, by pid, at once. Returns the seconds each part took:
        ``kill_s`` (old head if still up + old workers), ``head_s`` (new head up, Jobs API answering),
        ``workers_s``, ``total_s``."""
        from ray.cluster_utils import Cluster
        from ray.job_submission import JobSubmissionClient

        start = time.monotonic()
        if not self.dead_clusters or self.dead_clusters[-1] is not self.cluster:
            self.kill_head()
        workers = self.workers()
        for index in workers:
            if index in self.processes:
                self.kill_node(index)
            else:
                self._kill_in_process_node(self.nodes.pop(index))
        killed = time.monotonic()
        self.head_args["dashboard_agent_listen_port"] = _free_port()
        self.cluster = Cluster(initialize_head=True, head_node_args=self.head_args)
        deadline = time.monotonic() + timeout
        while True:  # until the Jobs API answers
            try:
                JobSubmissionClient(self.dashboard_url).list_jobs()
                break
            except (OSError, RuntimeError):  # refused (requests errors are OSErrors), or not ready yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        head = time.monotonic()
        for _ in workers:
            self.add_worker(wait=False)
        self.wait_for_nodes(timeout)
        done = time.monotonic()
        return {"kill_s": round(killed - start, 2), "head_s": round(head - killed, 2),
                "workers_s": round(done - head, 2), "total_s": round(done - start, 2)}

    def workers(self) -> list[int]:
        """Indices of the live worker nodes this object started."""
        return sorted([*self.nodes, *self.processes])

    def node_id(self, index: int) -> str:
        return self.nodes[index].node_id if index in self.nodes else self.process_node_ids[index]

    def wait_for_nodes(self, timeout: float = 120.0) -> None:
        """Until the GCS counts exactly the live nodes this object started (a loaded machine is slow)."""
        self.cluster.wait_for_nodes(timeout=timeout)

    # ------------------------------------------------------------------ addresses

    @property
    def address(self) -> str:
        """What ``ray.init(address=...)`` / ``RAY_ADDRESS`` takes (GCS host:port)."""
        return self.cluster.address

    @property
    def dashboard_url(self) -> str:
        """The Jobs API (``slime submit --address``)."""
        return "http://" + self.cluster.webui_url

    def pids(self) -> list[int]:
        """Pids of every process the nodes run (raylets, GCS, agents, dashboard)."""
        out = []
        for node in self.cluster.list_all_nodes() if self.cluster else []:
            for infos in node.all_processes.values():
                out += [i.process.pid for i in infos if i.process is not None]
        return out + [p.pid for p in self.processes.values()]


def init_embedded(*, include_dashboard: bool = True, runtime_env: dict | None = None, **kwargs) -> None:
    """``ray.init(address="local", ...)``: a new one-node Ray for this process that keeps to itself when other Rays
    run on the machine (a second job, a test worker, a ``ray start`` cluster). Its dashboard takes a free port
    instead of 8265, and its workers' state-API calls go to that dashboard: Ray Train's PlacementGroupCleaner asks
    the state API whether the run's controller still lives, and without an address that is "the latest Ray instance
    on the machine", which may be another one. (Only the workers get ``RAY_API_SERVER_ADDRESS``: in a driver it
    would also redirect job-submission clients meant for other clusters.)"""
    import ray

    runtime_env = dict(runtime_env or {})
    env = dict(runtime_env.get("env_vars") or {})
    # Ray Train's preemption watcher (one more actor process per run, polling node drains) has nothing to watch on
    # a one-node Ray that goes away with this process.
    env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if include_dashboard:
        port = _free_port()
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    if env:
        runtime_env["env_vars"] = env
    ray.init(address="local", include_dashboard=include_dashboard, runtime_env=runtime_env or None, **kwargs)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _kill_tree(pids: list[int], timeout: float = 30.0) -> None:
    """SIGKILL ``pids`` and all their descendants (collected first: a child whose parent is killed is
    re-parented and no longer found), then wait until every one is gone."""
    import psutil

    procs = []
    for pid in pids:
        try:
            parent = psutil.Process(pid)
            procs += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass

    def gone(proc: psutil.Process) -> bool:  # exited, or a zombie its (new) parent has not reaped yet
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + timeout
    while alive := [p.pid for p in procs if not gone(p)]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"still alive {timeout} s after SIGKILL: {alive}")
        time.sleep(0.05)

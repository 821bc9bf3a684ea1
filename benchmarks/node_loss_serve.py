"""Node loss while serving (issue 24), the serving case of ``benchmarks.node_loss``: the vLLM app with a replica on
each of two worker nodes under load from the official ``openai`` client; one node is killed and replaced. See
``benchmarks.node_loss`` for the design (who retries, what is counted)."""

from __future__ import annotations

import json
import time

from benchmarks.node_loss import SERVE_APP, SERVE_DEPLOYMENT, SERVE_MODEL_ID, png_url, poll, say
from benchmarks.serve_parts import ClientThreads


def replica_nodes(app: str = SERVE_APP) -> dict[str, str]:
    """Live Serve replica actors of ``app`` -> node id."""
    import ray
    from ray.util.state import list_actors

    # this driver's cluster: without an address the state API refuses when another Ray runs on the machine
    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
    return {a.actor_id: a.node_id for a in alive if a.class_name.startswith(f"ServeReplica:{app}:")}


def running_replicas(app: str = SERVE_APP, deployment: str = SERVE_DEPLOYMENT) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    return status.deployments[deployment].replica_states.get("RUNNING", 0) if status else 0


class ChatLoad(ClientThreads):
    """``clients`` threads, each an ``openai.OpenAI`` (with its own retries) posting a text + image chat request
    in a closed loop until stopped, plus one thread polling ``/healthz`` every 0.25 s. Records every request
    (start, end, ok, error), every HTTP attempt (status or the connection error) and every health probe."""

    join_s = 150.0

    def __init__(self, base_url: str, clients: int = 3, max_tokens: int = 8, max_retries: int = 2,
                 pause_s: float = 0.0) -> None:
        super().__init__()
        self.base_url, self.max_retries, self.pause_s = base_url, max_retries, pause_s
        self.requests: list[dict] = []  # {"start", "end", "ok", "error"}
        self.attempts: list[dict] = []  # {"t", "status"} (-1: no response)
        self.health: list[tuple[float, int]] = []
        self.messages = [{"role": "user", "content": [{"type": "text", "text": "describe the picture"},
                                                      {"type": "image_url", "image_url": {"url": png_url()}}]}]
        self.max_tokens = max_tokens
        self.spawn(self._client, clients)
        self.spawn(self._health)

    def _client(self) -> None:
        import httpx
        import openai

        def on_response(response: httpx.Response) -> None:
            with self.lock:
                self.attempts.append({"t": time.monotonic(), "status": response.status_code})

        class Counted(httpx.HTTPTransport):  # attempts that got no response at all (connection reset, ...)
            def handle_request(inner, request):
                try:
                    return super().handle_request(request)
                except Exception:
                    with self.lock:
                        self.attempts.append({"t": time.monotonic(), "status": -1})
                    raise

        http = httpx.Client(transport=Counted(), event_hooks={"response": [on_response]}, timeout=120)
        client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", max_retries=self.max_retries,
                               http_client=http)
        with http:
            while not self.stop.is_set():
                row = {"start": time.monotonic()}
                try:
                    out = client.chat.completions.create(model=SERVE_MODEL_ID, messages=self.messages,
                                                         max_tokens=self.max_tokens)
                    row["ok"] = bool(out.choices) and out.choices[0].message.content is not None
                except Exception as e:  # noqa: BLE001 - retries used up: a failed request, whatever the cause
                    row["ok"], row["error"] = False, f"{type(e).__name__}: {str(e)[:200]}"
                row["end"] = time.monotonic()
                with self.lock:
                    self.requests.append(row)
                self.stop.wait(self.pause_s)  # 0: a closed loop, each client always waiting on one request

    def _health(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=10) as c:
            while not self.stop.is_set():
                try:
                    status = c.get("/healthz").status_code
                except Exception:  # noqa: BLE001 - no answer at all is an unhealthy probe
                    status = -1
                with self.lock:
                    self.health.append((time.monotonic(), status))
                self.stop.wait(0.25)

    def done(self) -> int:
        with self.lock:
            return sum(r["ok"] for r in self.requests)



def serve_case(cluster, model: str, *, clients: int = 3, pause_s: float = 0.0, after_s: float = 5.0,
               timeout_s: float = 300.0) -> dict:
    """Two vLLM replicas on two worker nodes under steady ``openai`` load (``clients`` each sending a request,
    then pausing ``pause_s``); the node of one is killed and a
    replacement node joins (as an autoscaler would provide; each replica needs a ``slime_worker``). Returns
    the counts: requests, failed (after the client's retries), failed attempts, requests in flight at the kill,
    health probes that were not 200, seconds from the kill until 2 replicas run again (one of them new)."""
    from ray import serve

    from pipelines.cluster import WORKER_RESOURCE
    from pipelines.serve.app import build_app
    from pipelines.serve.ingress import free_port

    while len(cluster.workers()) < 2:
        cluster.add_worker()
    port = free_port()
    serve.shutdown()  # any earlier Serve keeps its own proxy and port
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    args = {"model": model, "model_id": SERVE_MODEL_ID, "engine": "vllm", "num_cpus": 0.25,
            "resources": {WORKER_RESOURCE: 1}, "max_ongoing_requests": 8,
            "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    started = time.monotonic()
    try:
        serve.run(build_app(args), name=SERVE_APP, route_prefix="/")
        poll(lambda: running_replicas() == 2, timeout_s, "2 running replicas")
        deploy_s = time.monotonic() - started
        before = replica_nodes()
        workers = {cluster.node_id(i): i for i in cluster.workers()}
        say(f"[node-loss] serve: 2 replicas up in {deploy_s:.1f} s on worker nodes "
            f"{sorted(workers[n] for n in before.values() if n in workers)}")
        base = f"http://127.0.0.1:{port}"
        with ChatLoad(base, clients=clients, pause_s=pause_s) as load:
            poll(lambda: load.done() >= 2 * clients, 120, "requests answered before the kill")
            victim_node = min(before.values())
            victim = workers[victim_node]
            killed_at = time.monotonic()
            cluster.kill_node(victim)
            say(f"[node-loss] serve: killed worker node {victim} after {load.done()} answered requests")
            replacement = cluster.add_worker()
            joined_s = time.monotonic() - killed_at
            say(f"[node-loss] serve: replacement node {replacement} joined {joined_s:.1f} s after the kill")

            def recovered() -> bool:
                now = replica_nodes()
                return (running_replicas() == 2 and len(now) == 2 and bool(set(now) - set(before))
                        and victim_node not in now.values())

            poll(recovered, timeout_s, "2 running replicas again, one of them new", every=0.5)
            recovery_s = time.monotonic() - killed_at
            after = replica_nodes()
            answered = load.done()
            poll(lambda: load.done() >= answered + 2 * clients, 120, "requests answered after the recovery")
            load.stop.wait(after_s)  # steady load on the recovered deployment for a few more seconds
        requests = list(load.requests)
        load_s = max(r["end"] for r in requests) - min(r["start"] for r in requests)
        attempts = list(load.attempts)
        failed = [r for r in requests if not r["ok"]]
        failed_attempts = [a for a in attempts if a["status"] != 200]
        unhealthy = [s for _, s in load.health if s != 200]
        run = longest = 0
        for _, status in load.health:  # the longest run of consecutive failed probes (a checker's failure threshold)
            run = run + 1 if status != 200 else 0
            longest = max(longest, run)
        out = {"requests": len(requests), "failed": len(failed), "recovery_s": round(recovery_s, 1),
               "load_s": round(load_s, 1), "requests_per_s": round(len(requests) / load_s, 1),
               "attempts": len(attempts), "failed_attempts": len(failed_attempts),
               "failed_attempt_statuses": sorted({a["status"] for a in failed_attempts}),
               "failed_attempt_s_after_kill": [round(a["t"] - killed_at, 2) for a in failed_attempts],
               "in_flight_at_kill": sum(1 for r in requests if r["start"] < killed_at < r["end"]), "clients": clients,
               "health_probes": len(load.health),
               "health_not_200": len(unhealthy), "health_statuses_not_200": sorted(set(unhealthy)),
               "health_longest_failed_run": longest, "deploy_s": round(deploy_s, 1),
               "replacement_joined_s": round(joined_s, 1), "killed_node": victim, "replacement_node": replacement,
               "replica_nodes_before": sorted(workers.get(n, -1) for n in before.values()),
               "replica_nodes_after": sorted({**workers, cluster.node_id(replacement): replacement}.get(n, -1)
                                             for n in after.values()),
               "errors": sorted({r["error"] for r in failed})[:3]}
        say(f"[node-loss] serve: {json.dumps(out)}")
        return out
    finally:
        serve.shutdown()

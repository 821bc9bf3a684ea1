"""``slime serve --follow``: the Serve app follows an MLflow Model Registry alias (``models:/NAME@champion``).

The alias is polled (``pipelines.tracking.models.AliasWatch``; why polling and not webhooks is argued there);
when it moves (the scheduler's gated promotion, a rollback, or by hand in the MLflow UI / a client) the app is
redeployed under the same name with the version's model directory. Same app name + a new model = a Serve
rolling update: replacements start before the old replicas stop (``max_surge_percent``), so requests keep being
answered through the roll. A roll that fails to deploy is reported and counted; the follower goes on polling.
"""

from __future__ import annotations

import dataclasses
import sys
import threading

from pipelines.serve.ingress import ServeArgs
from pipelines.tracking.models import AliasWatch


class AliasFollower:
    """Rolls the Serve app ``app_name`` (already serving ``cfg``, i.e. ``version`` of ``model_uri``) to the
    version ``model_uri``'s alias names whenever it moves. ``poll()`` checks once; ``run()`` loops."""

    def __init__(self, cfg: ServeArgs, model_uri: str, *, tracking_uri: str | None = None, version: str | None = None,
                 app_name: str = "slime", route_prefix: str = "/") -> None:
        self.cfg, self.model_uri, self.app_name, self.route_prefix = cfg, model_uri, app_name, route_prefix
        self.watch = AliasWatch(model_uri, tracking_uri, current=version)
        self.rolls: list[str] = []  # versions rolled to, in order
        self.failures = 0

    @property
    def version(self) -> str | None:
        return self.watch.version

    def poll(self) -> str | None:
        """Roll to the alias's version if it moved since the last poll; returns that version, else None."""
        moved = self.watch.changed()
        if not moved:
            return None
        directory, mv = moved
        from ray import serve

        from pipelines.serve.app import build_app

        cfg = dataclasses.replace(self.cfg, model=directory)
        print(f"{self.model_uri} moved to version {mv['version']}: rolling {self.app_name} to {directory}", flush=True)
        try:
            # returns once the new replicas run (blocking=False only means: do not block forever after)
            serve.run(build_app(cfg), name=self.app_name, route_prefix=self.route_prefix, blocking=False)
        except Exception as e:  # noqa: BLE001 - the endpoint keeps what it serves; the next move is followed
            self.failures += 1
            print(f"rolling to version {mv['version']} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return None
        self.cfg = cfg
        self.rolls.append(mv["version"])
        return mv["version"]

    def run(self, interval_s: float, stop: threading.Event | None = None) -> None:
        """Poll every ``interval_s`` until ``stop`` is set (Ctrl-C in ``slime serve``)."""
        stop = stop or threading.Event()
        while not stop.wait(interval_s):
            self.poll()

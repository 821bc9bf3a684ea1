"""What a person sees while a job runs: one line per stage, one progress bar per training phase, a summary
table at the end. Ray's and Ray Data's own progress bars and internal logs go to files in the Ray session
log directory (printed once), not to the console; nothing is lost, it is just not on screen.

    story()                   where a job's own lines go: the terminal
    framework_output_to(path) inside it, everything else the process writes (Ray's driver warnings and raylet
                              messages, vLLM / transformers logs, C++ logging) goes to ``path`` instead
    quiet_ray_init_kwargs()   ray.init(...) settings: workers' stdout/stderr stay in their log files
    quiet_driver_logs()       Ray Data / Serve / Train driver-side loggers: warnings and errors only
    ray_log_dir()             <session>/logs, where every worker's and Ray Data's full logs are
    TrainProgress             follows the run's metrics.jsonl from the driver: a tqdm bar per phase on a
                              terminal, a line every N steps otherwise (CI logs, `> out.txt`)
    summary_table(rows)       one line per phase: steps, first -> last loss, samples/s, wall time

Why the driver follows metrics.jsonl instead of printing from the workers: with ``log_to_driver=False``
worker output is not forwarded (that is what removes Ray Data's redrawn bars from the console), and rank
0 already writes every step to metrics.jsonl, so the driver renders from the same numbers the plots use.

The "constructor arguments in the object store and max_restarts > 0" warning Ray prints for every Ray
Data actor pool: Ray Data itself ``ray.put``s the map transformer and hands its reference to every
``_MapWorker`` it creates (``MapOperator._map_transformer_ref``), whatever our constructor arguments
are (ours are a few short strings). The operator holds that reference until the dataset finishes, so
it cannot go out of scope while an actor might restart, and a lost copy means the owner process (the
executor) is gone, which ends the dataset anyway. Turning restarts off (``max_restarts=0``) would
silence it and lose actor fault tolerance, so we keep restarts and the line lands in the log files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from typing import TextIO

from pipelines import storage
from pipelines.plots import read_jsonl, step_rows


_story: TextIO | None = None


def story() -> TextIO:
    """The stream for a job's own lines (stages, progress, results): the terminal."""
    return _story or sys.stdout


@contextlib.contextmanager
def framework_output_to(path: str):
    """Inside the block, file descriptors 1 and 2 (so ``sys.stdout``/``sys.stderr``, logging handlers, Ray's
    raylet messages that its driver prints to stdout, and C++ logging) write to ``path``; ``story()`` keeps the
    terminal they had. Undone on exit, so a failure's message reaches the terminal again."""
    global _story
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        _story = terminal
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            _story = None
            terminal.close()


def quiet_ray_init_kwargs() -> dict:
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def quiet_driver_logs() -> None:
    """Keep the console for warnings: Ray Data's progress bars off, its INFO lines to ray-data.log only."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    for handler in logging.getLogger("ray.data").handlers:  # we turned them off: no need to say so
        handler.addFilter(lambda r: "Progress bars disabled" not in r.getMessage())
    for name in ("ray.data", "ray.serve", "ray.train", "ray.tune", "ray"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and type(handler).__name__ != "SessionFileHandler":
                handler.setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def ray_log_dir() -> str | None:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None
    return storage.join(node.get_session_dir_path(), "logs")


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class TrainProgress:
    """Follows ``metrics_uri`` (local path or s3://) in a thread while ``trainer.fit()`` blocks."""

    def __init__(self, metrics_uri: str, plan: list[int], phase_names: list[str], *, every: int = 10,
                 interactive: bool | None = None, poll_s: float = 1.0, stream=None) -> None:
        self.uri, self.plan, self.names, self.every, self.poll_s = metrics_uri, plan, phase_names, max(1, every), poll_s
        self.stream = stream or story()
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.seen: set[int] = set()
        self.bar = None
        self.bar_phase: int | None = None
        self.started: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="train-progress", daemon=True)

    def __enter__(self) -> TrainProgress:
        if storage.exists(self.uri):  # a resumed run: what earlier attempts logged is not news
            self.seen = {r["global_step"] for r in step_rows(read_jsonl(storage.read_bytes(self.uri)))}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # the last steps, written just before fit() returned
        if self.bar is not None:
            self.bar.close()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # a half-written remote object: try again next poll
                continue

    def poll(self) -> None:
        if not storage.exists(self.uri):
            return
        for row in step_rows(read_jsonl(storage.read_bytes(self.uri))):
            if row["global_step"] not in self.seen:
                self.seen.add(row["global_step"])
                self.show(row)

    def show(self, m: dict) -> None:
        index, step, total = int(m["phase_index"]), int(m["step"]), int(m["phase_steps"])
        now = float(m.get("time", time.time()))  # when rank 0 logged the step, not when we read it
        self.started.setdefault(index, now - float(m.get("step_time_s", 0.0)) * step)
        post = f"loss {m['loss']:.4f} {m['samples_per_s']:.1f} samples/s"
        if self.interactive:
            from tqdm import tqdm

            if self.bar_phase != index:
                if self.bar is not None:
                    self.bar.close()
                self.bar = tqdm(total=total, desc=f"phase {m['phase']}", unit="step", file=self.stream,
                                initial=step - 1, dynamic_ncols=True)
                self.bar_phase = index
            self.bar.set_postfix_str(post, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if step % self.every and step != total and step != 1:
            return
        elapsed = now - self.started[index]
        eta = elapsed / step * (total - step) if step else math.nan
        print(f"[phase {m['phase']}] step {step}/{total} {post} lr {m['lr']:.1e} "
              f"elapsed {_fmt_time(elapsed)} eta {_fmt_time(eta)}", file=self.stream, flush=True)


def summary_table(rows: list[dict]) -> str:
    """One line per phase from metrics.jsonl rows."""
    steps = step_rows(rows)
    phases: dict[str, list[dict]] = {}
    for r in steps:
        phases.setdefault(r["phase"], []).append(r)
    width = max([len(p) for p in phases] + [5])
    lines = [f"{'phase':<{width}}  steps  loss first -> last  samples/s  time"]
    for name, rs in phases.items():
        wall = sum(float(r.get("step_time_s", 0.0)) for r in rs)
        rate = sum(r["samples_per_s"] for r in rs) / len(rs)
        lines.append(f"{name:<{width}}  {len(rs):>5}  {rs[0]['loss']:>9.4f} -> {rs[-1]['loss']:<7.4f}  "
                     f"{rate:>9.1f}  {_fmt_time(wall)}")
    return "\n".join(lines)

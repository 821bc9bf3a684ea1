"""What a person sees: progress from metrics.jsonl (lines off a terminal, bars on one), the per-phase
summary, and the loss / accuracy plots. No Ray: the driver side reads the same file rank 0 writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from pipelines.console import TrainProgress, summary_table
from pipelines.plots import plot_accuracy, plot_training, read_jsonl, step_rows


def rows(plan=(("I-a", 4), ("II", 6))):
    out, g = [{"event": "phase_start", "phase": "I-a"}], 0
    for index, (name, total) in enumerate(plan):
        for step in range(1, total + 1):
            g += 1
            out.append({"phase": name, "phase_index": index, "step": step, "phase_steps": total, "global_step": g,
                        "loss": 5.0 / g, "lr": 1e-3 * step / total, "samples_per_s": 10.0, "step_time_s": 0.1})
    return out


def write(path, rs):
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))


def test_step_rows_keep_the_last_attempt_and_skip_torn_lines():
    rs = rows()
    retried = {**rs[3], "loss": 99.0}  # a resumed attempt re-logs global step 3
    data = ("".join(json.dumps(r) + "\n" for r in rs + [retried]) + '{"phase": "II", "ste').encode()
    steps = step_rows(read_jsonl(data))
    assert [r["global_step"] for r in steps] == list(range(1, 11))
    assert steps[2]["loss"] == 99.0


def test_progress_lines_off_a_terminal(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write(log, rows()[:1])
    out = io.StringIO()
    with TrainProgress(str(log), [4, 6], ["I-a", "II"], every=2, interactive=False, stream=out, poll_s=0.01) as p:
        write(log, rows())
    p.poll()
    lines = out.getvalue().splitlines()
    # step 1, every 2nd step and each phase's last step, each once
    assert [ln.split(" loss")[0] for ln in lines] == [
        "[phase I-a] step 1/4", "[phase I-a] step 2/4", "[phase I-a] step 4/4",
        "[phase II] step 1/6", "[phase II] step 2/6", "[phase II] step 4/6", "[phase II] step 6/6"]
    assert all("eta" in ln and "samples/s" in ln for ln in lines)


def test_progress_resumed_run_shows_only_new_steps(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write(log, rows()[:5])  # steps 1-4 from an earlier attempt
    out = io.StringIO()
    with TrainProgress(str(log), [4, 6], ["I-a", "II"], every=1, interactive=False, stream=out, poll_s=0.01):
        write(log, rows())
    assert [ln.split(" loss")[0] for ln in out.getvalue().splitlines()] == [f"[phase II] step {i}/6"
                                                                           for i in range(1, 7)]


def test_progress_bar_on_a_terminal(tmp_path):
    log = tmp_path / "metrics.jsonl"
    out = io.StringIO()
    with TrainProgress(str(log), [4, 6], ["I-a", "II"], interactive=True, stream=out, poll_s=0.01):
        write(log, rows())
    text = out.getvalue()
    assert "phase I-a" in text and "phase II" in text and "6/6" in text and "loss" in text


def test_summary_table_and_plots():
    table = summary_table(rows()).splitlines()
    assert len(table) == 3 and table[1].split()[:2] == ["I-a", "4"] and table[2].split()[:2] == ["II", "6"]
    png = plot_training(rows(), title="run")
    assert Image.open(io.BytesIO(png)).size[0] > 500
    metrics = {"accuracy": 0.5, "num_samples": 8, "per_task": {
        "texture": {"accuracy": 0.75, "num_samples": 4, "chance": 0.25},
        "background": {"accuracy": 0.25, "num_samples": 4, "chance": 0.5}}}
    assert Image.open(io.BytesIO(plot_accuracy(metrics))).format == "PNG"
    assert Image.open(io.BytesIO(plot_training([]))).format == "PNG"  # nothing logged yet still draws


def test_framework_output_goes_to_the_log_file_and_the_story_to_the_terminal(tmp_path):
    """Everything a process writes to fds 1 and 2 inside ``framework_output_to`` (print, logging, C-level
    writes as Ray's C++ core and raylet messages make) lands in the file; ``story()`` lines on the terminal;
    after the block both streams are the terminal's again."""
    import subprocess
    import sys
    import textwrap

    log = tmp_path / "logs" / "console.log"
    code = textwrap.dedent(f"""
        import logging, os, sys, warnings
        from pipelines.console import framework_output_to, story
        logging.basicConfig()
        with framework_output_to({str(log)!r}):
            print("story line", file=story())
            print("framework print")
            logging.getLogger("ray").warning("framework WARNING")
            warnings.warn("framework UserWarning")
            os.write(2, b"C-level stderr\\n")
            os.write(1, b"C-level stdout\\n")
        print("after on stdout")
        print("after on stderr", file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["story line", "after on stdout"]
    assert proc.stderr.splitlines() == ["after on stderr"]
    written = log.read_text()
    for line in ("framework print", "framework WARNING", "framework UserWarning", "C-level stderr", "C-level stdout"):
        assert line in written, line

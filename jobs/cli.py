"""``slime <command> ...``: one console script for every job. ``slime train ...`` is exactly
``python -m jobs.train ...``; modules are imported only when their command runs."""

from __future__ import annotations

import importlib
import sys

# command -> (module:function, one-line help). status/logs/stop share jobs/submit.py.
COMMANDS: dict[str, tuple[str, str]] = {
    "tokens": ("jobs.tokens:main", "visual-token budget of an image size under a config"),
    "synth": ("jobs.synth:main", "generate the synthetic high-detail dataset"),
    "pack": ("jobs.pack:main", "pack LLaVA-format data into webdataset shards + manifest.json"),
    "train": ("jobs.train:main", "train / fine-tune with Ray Train (phases from the config)"),
    "evaluate": ("jobs.evaluate:main", "evaluate a model directory on a validation set -> metrics.json"),
    "lmms-eval": ("jobs.lmms_eval:main", "lmms-eval (make harness) against a served model -> lmms_eval.json"),
    "serve": ("jobs.serve:main", "run the OpenAI-compatible Ray Serve app"),
    "explain": ("jobs.explain:main", "draw which local tokens a question keeps on an image"),
    "demo": ("jobs.demo:main", "the whole pipeline end to end on a laptop"),
    "cluster": ("jobs.cluster:main", "a local multi-node Ray cluster (head + N worker nodes) until Ctrl-C"),
    "schedule": ("jobs.schedule:main", "scheduled retraining (--cron EXPR | --once)"),
    "submit": ("jobs.submit:main", "submit a job to a Ray cluster: slime submit NAME --address URL -- ARGS"),
    "status": ("jobs.submit:status_main", "status of a submitted job: slime status JOB_ID --address URL"),
    "logs": ("jobs.submit:logs_main", "logs of a submitted job: slime logs JOB_ID --address URL [--follow]"),
    "stop": ("jobs.submit:stop_main", "stop a submitted job: slime stop JOB_ID --address URL"),
    "register": ("jobs.register:main", "register a model directory in the model registry"),
    "promote": ("jobs.promote:main", "point the registry's production at a version"),
    "merge": ("jobs.merge:main", "fold a LoRA adapter into its base: a full model directory"),
    "convert": ("jobs.convert:main", "convert released SliME / Dense Connector weights into a model directory"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: slime <command> [args...]   (same as: python -m jobs.<command> [args...])\n\n"
            "commands:\n" + "\n".join(lines) + "\n\nslime <command> --help shows a command's options.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"slime: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func = COMMANDS[name][0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the job exists but one of its imports is missing: show the real error
            raise
        print(f"slime {name}: {module_name.replace('.', '/')}.py is not part of this installation yet",
              file=sys.stderr)
        return 2
    return int(getattr(module, func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

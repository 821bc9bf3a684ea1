"""Imports flow jobs -> pipelines -> slime (STYLE.md): the model package stays pure PyTorch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_SLIME = ("ray", "torch.distributed", "deepspeed", "boto3", "s3fs", "vllm")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import, at any depth (functions included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            # "from torch import distributed" imports torch.distributed too
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def banned(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


def offences(folder: str, roots: tuple[str, ...]) -> list[str]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no python files under {folder}/"
    return [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in files
            for line, mod in imported_modules(p) if banned(mod, roots)]


def test_slime_is_pure_pytorch():
    assert offences("slime", FORBIDDEN_IN_SLIME) == []


def test_pipelines_never_import_jobs():
    assert offences("pipelines", ("jobs",)) == []


def test_slime_never_imports_upper_layers():
    assert offences("slime", ("pipelines", "jobs")) == []


@pytest.mark.parametrize(("source", "hit"), [("import ray", True), ("from ray import data", True),
                                             ("import torch.distributed as dist", True),
                                             ("from torch import distributed", True),
                                             ("from torch.distributed import fsdp", True),
                                             ("def f():\n    import deepspeed", True), ("import s3fs", True),
                                             ("import boto3.session", True), ("import rayon", False),
                                             ("from vllm.multimodal import MULTIMODAL_REGISTRY", True),
                                             ("import vllm_cpu_extras", False),
                                             ("import torch", False), ("from torch import nn", False)])
def test_the_checker_catches_what_it_should(tmp_path, source, hit):
    f = tmp_path / "m.py"
    f.write_text(source + "\n")
    assert any(banned(m, FORBIDDEN_IN_SLIME) for _, m in imported_modules(f)) == hit


def test_vllm_code_lives_in_pipelines():
    """The vLLM adapter is a serving-stage concern: only pipelines/ (and tests/benchmarks) import vllm."""
    assert "pipelines/serve/vllm_model.py" in {p.split(":")[0] for p in offences("pipelines", ("vllm",))}
    assert offences("jobs", ("vllm",)) == []


# ----------------------------------------------------------------------------- stages inside pipelines/
# A module's "part" is its sub-package (data, train, serve, lifecycle) or, at the top, its own name. What
# each part may import of the others, as measured when pipelines/ was split by stage (each stage's
# __init__ docstring says the same). A new edge is a design decision: add it here, on purpose.
STAGES = ("data", "train", "serve", "lifecycle")
SHARED = ("storage", "console", "plots", "tracking")  # leaves every stage may use
MAY_IMPORT = {
    "storage": set(),
    "plots": set(),
    "tracking": {"storage"},  # MLflow over its REST API
    "answers": set(),  # standard library only: the lmms-eval task folder carries a copy of it
    "console": {"storage", "plots"},
    "data": {"storage"},
    "train": {"data", *SHARED},
    "serve": {*SHARED},
    "lifecycle": {"train", "evaluate", *SHARED},
    "evaluate": {"data", "serve", "answers", *SHARED},
    "harness": {"data", "serve", "lifecycle", "evaluate", "answers", *SHARED},
    "demo": {*STAGES, "evaluate", "cluster", *SHARED},  # cluster: init_embedded, its own one-node Ray
    "cluster": set(),  # a local multi-node Ray cluster (tests, slime cluster): Ray only
}


def part_of(path: Path) -> str:
    return path.relative_to(ROOT / "pipelines").with_suffix("").parts[0]


def pipelines_modules() -> list[Path]:
    return [p for p in sorted((ROOT / "pipelines").rglob("*.py")) if p != ROOT / "pipelines" / "__init__.py"]


def pipelines_imports() -> list[tuple[Path, int, str]]:
    """(file, line, module) for every import of a pipelines module by a module in pipelines/."""
    return [(p, line, mod) for p in pipelines_modules() for line, mod in imported_modules(p)
            if mod.startswith("pipelines.")]


def test_every_pipelines_module_belongs_to_a_known_part():
    assert {part_of(p) for p in pipelines_modules()} == set(MAY_IMPORT)


def test_stages_import_only_what_their_init_allows():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p, line, mod in pipelines_imports()
           if (target := mod.split(".")[1]) != (source := part_of(p)) and target not in MAY_IMPORT[source]]
    assert bad == []


def test_serving_never_imports_the_training_loop():
    """A replica needs a checkpoint path, not the trainer (open_clip: the library never imports the trainer)."""
    assert offences("pipelines/serve", ("pipelines.train",)) == []


def test_data_never_imports_the_stages_that_consume_it():
    assert offences("pipelines/data", ("pipelines.serve", "pipelines.train", "pipelines.lifecycle",
                                       "pipelines.evaluate", "pipelines.demo")) == []


def test_training_never_imports_serving_or_lifecycle():
    assert offences("pipelines/train", ("pipelines.serve", "pipelines.lifecycle", "pipelines.evaluate")) == []


def test_lifecycle_rolls_serve_by_import_path_not_by_import():
    assert offences("pipelines/lifecycle", ("pipelines.serve", "pipelines.data")) == []


def test_shared_modules_import_no_stage():
    stages = tuple(f"pipelines.{s}" for s in (*STAGES, "evaluate", "demo"))
    files = [f for name in SHARED for f in ([ROOT / "pipelines" / f"{name}.py"] if (ROOT / "pipelines" / f"{name}.py")
                                            .exists() else sorted((ROOT / "pipelines" / name).rglob("*.py")))]
    assert len(files) > len(SHARED)  # tracking is a package
    assert [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in files
            for line, mod in imported_modules(f) if banned(mod, stages)] == []


def test_no_part_reaches_into_another_parts_private_names():
    """``from pipelines.<part>.<mod> import _x`` only inside the same part; across parts use public names."""
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p, line, mod in pipelines_imports()
           if (name := mod.rsplit(".", 1)[-1]).startswith("_") and not name.startswith("__")
           and mod.split(".")[1] != part_of(p)]
    assert bad == []


def test_importing_a_stage_package_is_free():
    """The stage ``__init__``s import nothing, so e.g. evaluation's ``pipelines.serve.engine`` does not pull
    in ray.serve/fastapi and ``pipelines.train.config`` does not pull in Ray Train or DeepSpeed."""
    code = ("import sys; import pipelines.data, pipelines.train, pipelines.serve, pipelines.lifecycle; "
            "import pipelines.serve.engine, pipelines.train.config; "
            "print(sorted(m for m in ('ray.serve', 'ray.train', 'fastapi', 'vllm', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_no_module_in_pipelines_is_over_400_lines():
    """STYLE.md: files mostly under 300 lines, none over 400; past that a file is two things."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "pipelines").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_the_manifests_import_path_still_names_the_builder():
    """cluster/*.yaml and live Serve apps say ``pipelines.serve:build_app``; the package resolves it lazily."""
    import importlib

    from pipelines.serve.app import build_app

    assert importlib.import_module("pipelines.serve").build_app is build_app


def import_graph(roots: tuple[str, ...] = ("pipelines", "slime", "jobs")) -> dict[str, set[str]]:
    """Module -> project modules it imports (at any depth). ``from pkg import sub`` is an edge to ``pkg.sub``,
    not to ``pkg``: importing a submodule is not a dependency on its package's ``__init__``."""
    paths = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for root in roots for p in (ROOT / root).rglob("*.py")}
    known = set(paths.values())
    graph = {}
    for path, name in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                subs = {f"{node.module}.{a.name}" for a in node.names} & known
                deps |= subs or {node.module}
        graph[name] = {d for d in deps if d in known and d != name}
    return graph


def test_no_import_circles():
    """Two modules that import each other (even lazily, inside a function) are one thing cut in two."""
    graph = import_graph()
    circles = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt == start:
                circles.append(" -> ".join(path + [start]))
            elif nxt not in path and len(path) < 5:
                walk(start, nxt, path + [nxt])

    for module in graph:
        walk(module, module, [module])
    assert not circles, circles[:5]

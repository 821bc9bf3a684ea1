"""Imports flow jobs -> pipelines -> slime (STYLE.md): the model package stays pure PyTorch."""

from __future__ import annotations

import ast
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
    assert "pipelines/vllm_model.py" in {p.split(":")[0] for p in offences("pipelines", ("vllm",))}
    assert offences("jobs", ("vllm",)) == []

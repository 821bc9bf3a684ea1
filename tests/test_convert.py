"""`slime convert` as a user meets it: config.json decides, flags only fill what it lacks, and every mistake
or unsupported release is one line naming the cause with exit code 2. (What a converted model computes
is tests/test_upstream_parity.py, on releases the official code wrote.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs import convert

RELEASES = Path(__file__).resolve().parent / "assets" / "upstream" / "releases"


def run(capsys, *argv: str) -> tuple[int, str]:
    code = convert.main(list(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("slime convert:")]
    return code, err[-1] if err else ""


def edited_release(tmp_path: Path, name: str, **config) -> Path:
    """A copy of a replica release with config.json fields changed (None deletes the field)."""
    out = tmp_path / name
    shutil.copytree(RELEASES / name, out)
    for sub in ("towers",):  # relative tower names resolve from the release's parents
        (tmp_path / sub).symlink_to(RELEASES.parent / sub)
    conf = json.loads((out / "config.json").read_text())
    for key, value in config.items():
        conf.pop(key, None) if value is None else conf.__setitem__(key, value)
    (out / "config.json").write_text(json.dumps(conf))
    return out


@pytest.mark.parametrize(("argv", "needle"), [
    (["--connector", "sci"], "--connector sci contradicts the release's mm_dense_connector_type sti"),
    (["--kind", "slime"], "--kind slime contradicts the release's kind dense_connector"),
])
def test_a_flag_that_contradicts_the_release_is_refused(tmp_path, capsys, argv, needle):
    code, line = run(capsys, "--upstream", str(RELEASES / "dc-clip-sti"), "--out", str(tmp_path / "o"), *argv)
    assert code == 2 and needle in line
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_flags_fill_what_the_release_lacks(tmp_path, capsys):
    release = edited_release(tmp_path, "dc-clip-dci", mm_dense_connector_type=None)
    code, line = run(capsys, "--upstream", str(release), "--out", str(tmp_path / "o"))
    assert code == 2 and "pass --connector sci or dci" in line  # 3x the tower's width: SCI or DCI, unsaid
    assert convert.main(["--upstream", str(release), "--out", str(tmp_path / "o"), "--connector", "dci"]) == 0
    assert "kind: dci" in (tmp_path / "o" / "slime_config.yaml").read_text()


@pytest.mark.parametrize(("config", "needle"), [
    ({"mm_projector_type": "qformer"}, "mm_projector_type 'qformer' is not supported"),
    ({"mm_hidden_size": 999}, "mm_hidden_size 999 does not match"),
    ({"mm_vision_tower": "nowhere/clip"}, "pass --vision-path"),
    ({"seperator": 7}, "seperator id 7"),
    ({"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature 'cls_patch'"),
])
def test_release_mistakes_are_one_line(tmp_path, capsys, config, needle):
    release = edited_release(tmp_path, "slime-vicuna", **config)
    code, line = run(capsys, "--upstream", str(release), "--out", str(tmp_path / "o"))
    assert code == 2 and needle in line and "Traceback" not in line


def test_lora_and_adapter_releases_need_their_base(tmp_path, capsys):
    for name, what in (("slime-lora", "a LoRA release"), ("slime-stage2-adapters", "an adapter-only stage")):
        code, line = run(capsys, "--upstream", str(RELEASES / name), "--out", str(tmp_path / name))
        assert code == 2 and what in line and "--base" in line


def test_not_a_release(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, line = run(capsys, "--upstream", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 2 and "has no config.json" in line

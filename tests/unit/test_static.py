"""One import name, no import circles between the core's rooms, and the type checker."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CODE_DIRS = ("polyalign", "stages", "flows", "data_cards", "tests", "bench")
BARE = {"stages", "flows", "data_cards"}


def _python_files() -> list[Path]:
    files: list[Path] = []
    for d in CODE_DIRS:
        if (ROOT / d).is_symlink():
            continue  # polyalign/stages etc. are the same files as stages/
        files += [p for p in (ROOT / d).rglob("*.py") if not any(part.is_symlink() for part in [p, *p.parents])]
    return sorted(set(files))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_nothing_imports_the_bare_top_level_folders():
    files = _python_files()
    assert len(files) > 40, "the scan found too few files"
    bad = [
        f"{p.relative_to(ROOT)}:{line}: import {mod}"
        for p in files
        for line, mod in _imports(p)
        if mod.split(".")[0] in BARE
    ]
    assert bad == [], "import polyalign.<package>, never the bare folder:\n" + "\n".join(bad)


def test_the_scan_would_catch_a_bare_import(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import os\nfrom stages.core import store\nimport flows.pipeline\n")
    assert [m for _, m in _imports(sample) if m.split(".")[0] in BARE] == ["stages.core", "flows.pipeline"]


def _module_imports(rel: str) -> set[str]:
    return {m for _, m in _imports(ROOT / rel)}


STAGE_MODULES = {f"polyalign.stages.{s}" for s in ("self_instruct", "translate", "sft", "preferences", "reward_model", "align", "evaluate")}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "stages" / "core").glob("*.py")))
def test_core_imports_no_stage_no_cli_and_no_prefect(path):
    mods = _module_imports(path)
    assert not mods & STAGE_MODULES, f"{path} imports a stage module"
    assert "polyalign" not in mods and "polyalign.cli" not in mods, f"{path} imports the CLI package"
    assert not any(m.split(".")[0] == "prefect" for m in mods), f"{path} imports Prefect"


def test_the_splits_close_no_circle():
    specs = _module_imports("stages/core/model_specs.py")
    assert not specs & {"polyalign.stages.core.prepare", "polyalign.stages.core.loading"}
    assert not _module_imports("stages/core/report.py") & STAGE_MODULES
    for stage in STAGE_MODULES:  # no stage reaches into another stage's helpers
        name = stage.rsplit(".", 1)[1]
        assert not _module_imports(f"stages/{name}.py") & (STAGE_MODULES - {stage}), name


def test_contract_module_is_light():
    code = "import sys, polyalign.stages.core.contract; print(sorted(m for m in ('torch', 'prefect', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_only_the_polyalign_name_imports_from_outside_the_repository(tmp_path):
    ok = subprocess.run([sys.executable, "-c", "import polyalign.stages.core.store"], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    for bare in sorted(BARE):
        proc = subprocess.run([sys.executable, "-c", f"import {bare}"], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, bare


def test_the_pytest_config_adds_no_pythonpath():
    text = (ROOT / "pyproject.toml").read_text()
    assert "pythonpath" not in text


def test_type_checker_resolves_every_polyalign_import():
    proc = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Success" in proc.stdout

"""The shape of the package: layers import downward only, no hidden imports, short modules.

docs/architecture.md describes the layers; pyproject.toml states them as an import-linter
contract, which `test_layers_import_downward_only` checks (every import, also those inside
functions).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxlm"
# Imports a library module may make inside a function: optional extras only.
OPTIONAL_EXTRAS = ("matplotlib", "pyarrow", "array_record")
ROOT_MODULES = {"__init__.py", "errors.py", "paths.py", "runs.py"}  # paths: a layer of one module
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _function_imports(path: Path) -> list[str]:
    """`module:line name` of every import inside a function body."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                names = [a.name for a in sub.names]
            elif isinstance(sub, ast.ImportFrom):
                names = [sub.module or ""]
            else:
                continue
            if not all(n.startswith(OPTIONAL_EXTRAS) for n in names):
                found.append(f"{path.relative_to(ROOT)}:{sub.lineno} {', '.join(names)}")
    return found


def lint_imports(config: Path, cwd: Path, path: Path | None = None) -> int:
    """import-linter's exit code for `config`, run in a child process: its logging set-up
    (dictConfig) would otherwise disable every logger already made in the test process."""
    code = "import sys; from importlinter import cli; sys.exit(cli.lint_imports(config_filename=sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(path or ""), str(ROOT)]))}
    return subprocess.run([sys.executable, "-c", code, str(config)], cwd=cwd, env=env).returncode


def test_layers_import_downward_only():
    assert lint_imports(ROOT / "pyproject.toml", ROOT) == 0


def test_the_contract_catches_a_wrong_way_import(tmp_path):
    # A copy of the contract over a two-layer package whose lower layer imports the upper
    # one: the same check must fail, so a passing run above means something.
    pkg = tmp_path / "toy"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "high" / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("def f():\n    from toy import high\n")
    (tmp_path / "contract.toml").write_text(
        textwrap.dedent(
            """
            [tool.importlinter]
            root_package = "toy"
            [[tool.importlinter.contracts]]
            name = "toy layers"
            type = "layers"
            containers = ["toy"]
            layers = ["high", "low"]
            """
        )
    )
    assert lint_imports(tmp_path / "contract.toml", tmp_path, path=tmp_path) == 1


def test_no_imports_inside_library_functions():
    # cli/ may import lazily (keeps `jaxlm --help` fast); elsewhere an import inside a
    # function would only hide a circle between layers.
    hidden = [
        line
        for path in _modules()
        if "cli" not in path.relative_to(PACKAGE).parts
        for line in _function_imports(path)
    ]
    assert not hidden, "imports inside functions:\n" + "\n".join(hidden)


def test_package_root_holds_only_layers():
    loose = {p.name for p in PACKAGE.glob("*.py")} - ROOT_MODULES
    assert not loose, f"modules in jaxlm/ that belong in a layer package: {sorted(loose)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_short(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (at most {MAX_LINES})"

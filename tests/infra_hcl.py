"""What the infra tests share: the tools of `make infra-tools`, infra/terraform parsed into
plain Python (terraform_tree, each test file's `tf` fixture) and HCL expressions evaluated for a
choice of variables."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TERRAFORM = REPO / "infra" / "terraform"
KNATIVE = REPO / "knative"
KNATIVE_PUBSUB = REPO / "infra" / "knative-pubsub"
TOOLS = REPO / ".cache" / "bin"
FUNCTIONS = {"ingest", "aggregate", "finalize"}
SERVICES = FUNCTIONS | {"console"}  # knative/'s Services: the functions and the operator console
HCL = dict[str, Any]


def tool(name: str) -> str:
    path = TOOLS / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"{path} is missing: run `make infra-tools` (builds OpenTofu and kustomize from the "
            "Go module proxy, installs checkov)",
            pytrace=False,
        )
    return str(path)


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)


def terraform() -> str:
    """The machine's terraform where it has one, else OpenTofu (make infra-tools)."""
    return tool("terraform" if (TOOLS / "terraform").exists() else "tofu")


def plain(value: Any) -> Any:
    """python-hcl2's tree without its markers and with string literals unquoted."""
    if isinstance(value, dict):
        return {
            plain(k): plain(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__")
        }
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def terraform_tree() -> dict[str, Any]:
    """All of infra/terraform/*.tf: resource[type][name], data[type][name], locals, variables,
    outputs, and each file's own tree."""
    try:
        import hcl2
    except ImportError:
        pytest.fail("python-hcl2 is missing: pip install -e '.[infra]'", pytrace=False)
    merged: dict[str, Any] = {
        "resource": defaultdict(dict),
        "data": defaultdict(dict),
        "locals": {},
        "variable": {},
        "output": {},
        "files": {},
    }
    for path in sorted(TERRAFORM.glob("*.tf")):
        with path.open() as f:
            tree = hcl2.load(f)
        merged["files"][path.name] = tree
        for kind in ("resource", "data"):
            for block in tree.get(kind, []):
                for rtype, named in plain(block).items():
                    merged[kind][rtype].update(named)
        for block in tree.get("locals", []):
            merged["locals"].update(plain(block))
        for kind in ("variable", "output"):
            for block in tree.get(kind, []):
                merged[kind].update(plain(block))
    return merged


def resource(tf: dict[str, Any], rtype: str, name: str) -> HCL:
    assert name in tf["resource"][rtype], f"infra/terraform has no {rtype}.{name}"
    return tf["resource"][rtype][name]


def local(tf: dict[str, Any], value: Any) -> Any:
    """A value, or the local it names (${local.x})."""
    match = re.fullmatch(r"\$\{local\.(\w+)\}", value) if isinstance(value, str) else None
    return local(tf, tf["locals"][match.group(1)]) if match else value


def block(value: Any) -> HCL:
    """A nested block (python-hcl2 gives a list of one)."""
    assert isinstance(value, list) and len(value) == 1, value
    return value[0]  # type: ignore[no-any-return]


def settings(tf: dict[str, Any], **given: Any) -> dict[str, Any]:
    """The variables' defaults, with some given."""
    return {name: v.get("default") for name, v in tf["variable"].items()} | given


def python_of(tf: dict[str, Any], expr: str, variables: dict[str, Any]) -> str:
    """A boolean HCL expression of variables and locals (==, !=, &&, ||, !) as Python."""
    body = expr[2:-1] if expr.startswith("${") else expr
    body = re.sub(r"!(?!=)", " not ", body).replace("&&", " and ").replace("||", " or ")

    def value(match: re.Match[str]) -> str:
        kind, name = match.groups()
        found = variables[name] if kind == "var" else tf["locals"][name]
        if kind == "local" and isinstance(found, str) and found.startswith("${"):
            return f"({python_of(tf, found, variables)})"
        return repr(found)

    return re.sub(r"\b(var|local)\.(\w+)", value, body)


def hcl_true(tf: dict[str, Any], expr: str, variables: dict[str, Any]) -> bool:
    return bool(eval(python_of(tf, expr, variables)))  # our own HCL, translated above


GATE = re.compile(r"\$\{(.+?) \? .+ : (?:0|\{\}|\[\])\}")  # condition ? ... : nothing


def exists(tf: dict[str, Any], declared: HCL, variables: dict[str, Any]) -> bool:
    """Whether Terraform creates a resource (or reads a data source) with these variables: a
    count or for_each of the form `condition ? ... : 0` (or {} or []) decides, anything else
    always creates it."""
    gate = declared.get("count", declared.get("for_each"))
    match = GATE.fullmatch(gate) if isinstance(gate, str) else None
    return hcl_true(tf, match.group(1), variables) if match else True


INNERMOST = re.compile(r"\$\{([^${}]*)\}")


def hcl_value(tf: dict[str, Any], value: Any, key: str, each: HCL) -> Any:
    """An attribute of a for_each resource for one key: each.key, each.value.x and locals
    resolved; references to resources, and locals that are expressions, stay as ${...} text."""
    if not isinstance(value, str):
        return value

    def with_each(ref: str) -> str:
        ref = re.sub(r"\beach\.key\b", json.dumps(key), ref)
        return re.sub(r"\beach\.value\.(\w+)", lambda m: json.dumps(each[m.group(1)]), ref)

    def lookup(ref: str) -> Any:  # None: not ours to resolve
        try:
            return json.loads(ref)
        except ValueError:
            pass
        path = re.fullmatch(r'local\.(\w+)((?:\.\w+|\["[^"]*"\])*)', ref)
        if path is None:
            return None
        found = tf["locals"][path.group(1)]
        for attr, index in re.findall(r'\.(\w+)|\["([^"]*)"\]', path.group(2)):
            found = found[attr or index]
        if isinstance(found, str) and found.startswith("${") and found.endswith("}"):
            return None
        return hcl_value(tf, found, key, each)

    whole = INNERMOST.fullmatch(value)
    if whole:
        found = lookup(with_each(whole.group(1)))
        return "${" + with_each(whole.group(1)) + "}" if found is None else found
    kept: list[str] = []

    def resolve(match: re.Match[str]) -> str:
        ref = with_each(match.group(1))
        found = lookup(ref)
        if found is None:
            kept.append("${" + ref + "}")
            return f"\0{len(kept) - 1}\0"
        return str(found)

    while (resolved := INNERMOST.sub(resolve, value)) != value:
        value = resolved
    return re.sub(r"\0(\d+)\0", lambda m: kept[int(m.group(1))], value)


def seconds(duration: str) -> float:
    match = re.fullmatch(r"([0-9.]+)s", duration)
    assert match, f"{duration!r} is not a duration in seconds, such as 1s or 0.5s"
    return float(match.group(1))

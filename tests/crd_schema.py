"""Validate custom resources against vendored CustomResourceDefinitions the way the API server does
with strict field validation (`kubectl --validate=strict`), shared by the Chaos Mesh and Knative
schema tests: an unknown field is an error unless the schema preserves unknown fields,
`x-kubernetes-int-or-string` takes an integer or a string, `nullable` takes null, and apiVersion,
kind and metadata are always allowed at the root (the API server adds them to every CRD)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator

__all__ = ["load_crds", "schema_errors", "structural_to_json_schema"]

Validators = dict[tuple[str, str], Draft7Validator]
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # CRDs are large: libyaml if there
# What the API server accepts at the root of every custom resource, listed in the CRD or not.
# metadata is checked by the API server's ObjectMeta rules, not by the CRD's schema.
_ROOT = {
    "apiVersion": {"type": "string"},
    "kind": {"type": "string"},
    "metadata": {"type": "object"},
}


def structural_to_json_schema(node: Any) -> Any:
    """A Kubernetes structural schema as Draft 7 JSON Schema, with the API server's meaning of
    its extensions; objects that list their properties refuse others (strict validation)."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: structural_to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = structural_to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [structural_to_json_schema(v) for v in value]
        elif key.startswith("x-kubernetes-") or key == "nullable":
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def root_schema(open_api_v3: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of a whole resource from its CRD's openAPIV3Schema."""
    schema = structural_to_json_schema(open_api_v3)
    if "properties" in schema:
        schema["properties"] = {**_ROOT, **schema["properties"]}
    return dict(schema)


def load_crds(directory: Path) -> Validators:
    """(apiVersion, kind) -> a validator, for every served version of every CRD in directory."""
    validators: Validators = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=_LOADER):
            if crd is None:
                continue
            assert crd["kind"] == "CustomResourceDefinition", path
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schema = root_schema(version["schema"]["openAPIV3Schema"])
                    Draft7Validator.check_schema(schema)
                    validators[(f"{group}/{version['name']}", kind)] = Draft7Validator(schema)
    return validators


def schema_errors(validators: Validators, doc: dict[str, Any]) -> list[str]:
    """'path: message' for each way doc breaks the schema of its kind; [] if it is valid."""
    validator = validators[(doc["apiVersion"], doc["kind"])]
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]

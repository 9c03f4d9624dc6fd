"""functions/openapi.yaml agrees with the ingest service as implemented: routes, errors, params."""

from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from microfl import handlers
from microfl.errors import ERROR_TABLE, http_error
from microfl.tokens import valid_id

SPEC_PATH = Path(__file__).resolve().parents[1] / "functions" / "openapi.yaml"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
UPLOAD_STATUSES = {400, 401, 403, 404, 409, 413, 422, 503}
UPDATE_ROUTE = "/v1/jobs/{job}/rounds/{round}/updates"


@functools.cache
def load_spec() -> dict[str, Any]:
    doc = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


@pytest.fixture
def spec() -> dict[str, Any]:
    return load_spec()


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """Follow local $refs ("#/a/b") until a node that is not one."""
    seen = set()
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local refs expected, got {ref}"
        assert ref not in seen, f"$ref cycle at {ref}"
        seen.add(ref)
        node = spec
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def route_template(pattern: str) -> tuple[str, dict[str, str]]:
    """'/v1/jobs/(?P<job>[^/]+)' -> ('/v1/jobs/{job}', {'job': '[^/]+'})."""
    out, groups, i = [], {}, 0
    while i < len(pattern):
        if pattern.startswith("(?P<", i):
            end = pattern.index(">", i)
            name = pattern[i + 4 : end]
            depth, j = 1, end + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(pattern[j], 0)
                j += 1
            groups[name] = pattern[end + 1 : j - 1]
            out.append("{" + name + "}")
            i = j
        else:
            out.append(pattern[i])
            i += 1
    template = "".join(out)
    assert not re.search(r"[()\[\]*+?|\\^$]", template), f"unhandled regex in {pattern}"
    return template, groups


def operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in spec["paths"].items()
            for method in item if method in HTTP_METHODS}


def parameters(spec: dict[str, Any], path: str, method: str) -> dict[tuple[str, str], Any]:
    item = spec["paths"][path]
    params = [resolve(spec, p) for p in item.get("parameters", [])]
    params += [resolve(spec, p) for p in item[method].get("parameters", [])]
    return {(p["in"], p["name"]): p for p in params}


def test_parses_as_openapi_3_1(spec: dict[str, Any]) -> None:
    assert re.fullmatch(r"3\.1\.\d+", str(spec["openapi"]))
    assert spec["info"]["title"] and spec["info"]["version"]
    assert isinstance(spec["paths"], dict) and spec["paths"]


def test_routes_match_paths_both_ways(spec: dict[str, Any]) -> None:
    implemented = {(method, route_template(pattern)[0]) for method, pattern, _ in handlers.ROUTES}
    documented = operations(spec)
    assert implemented - documented == set(), "routes missing from openapi.yaml"
    assert documented - implemented == set(), "openapi.yaml documents routes that do not exist"


def test_path_parameters_are_declared(spec: dict[str, Any]) -> None:
    for method, pattern, _ in handlers.ROUTES:
        path, groups = route_template(pattern)
        params = parameters(spec, path, method.lower())
        path_params = {name for where, name in params if where == "path"}
        assert path_params == set(groups), path
        for name in groups:
            assert params["path", name]["required"] is True


def test_round_pattern_is_the_routes(spec: dict[str, Any]) -> None:
    for method, pattern, _ in handlers.ROUTES:
        path, groups = route_template(pattern)
        if "round" in groups:
            schema = parameters(spec, path, method.lower())["path", "round"]["schema"]
            assert schema["pattern"] == f"^{groups['round']}$"


def _job_pattern(spec: dict[str, Any]) -> re.Pattern[str]:
    schema = parameters(spec, "/v1/jobs/{job}", "get")["path", "job"]["schema"]
    # ECMA-262 "$" is end of input; Python's also matches before a final "\n".
    return re.compile(re.sub(r"\$$", r"\\Z", schema["pattern"]))


@pytest.mark.parametrize("job", [
    "a", "mnist", "Job-1.v2_x", "9", "a" * 64, "a" * 65, "", ".a", "-a", "_a", "a..b", "a.b",
    "a/b", "a b", "é", "a\n", "..", "a.",
])
def test_job_pattern_is_valid_id(spec: dict[str, Any], job: str) -> None:
    assert bool(_job_pattern(spec).search(job)) == valid_id(job)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab9Z._-/ \n", max_size=70))
def test_job_pattern_is_valid_id_generated(job: str) -> None:
    assert bool(_job_pattern(load_spec()).search(job)) == valid_id(job)


def test_error_schema_enum(spec: dict[str, Any]) -> None:
    enum = set(spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    table_codes = {row[1] for row in ERROR_TABLE.values()}
    assert table_codes <= enum, f"missing: {table_codes - enum}"
    # The codes the handlers answer outside the table.
    literal = set(re.findall(r'"error":\s*"([a-z_]+)"', inspect.getsource(handlers)))
    fallback = http_error(RuntimeError("boom"))[1]["error"]
    assert {"not_found", "method_not_allowed"} <= literal
    assert fallback == "internal"
    assert enum == table_codes | literal | {fallback}


def test_upload_documents_every_error_status(spec: dict[str, Any]) -> None:
    table_statuses = {row[0] for row in ERROR_TABLE.values()}
    assert table_statuses >= UPLOAD_STATUSES
    responses = spec["paths"][UPDATE_ROUTE]["post"]["responses"]
    documented = {int(status) for status in responses}
    assert documented >= UPLOAD_STATUSES | {200, 202}
    receipt = resolve(spec, responses["202"]["content"]["application/json"]["schema"])
    assert set(receipt["required"]) == {"round", "client", "status"}
    assert set(receipt["properties"]["status"]["enum"]) == {"accepted", "replay"}
    body = spec["paths"][UPDATE_ROUTE]["post"]["requestBody"]
    assert body["required"] is True and set(body["content"]) == {"application/octet-stream"}


def test_error_responses_use_error_schema(spec: dict[str, Any]) -> None:
    error = spec["components"]["schemas"]["Error"]
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            for status, response in op["responses"].items():
                if int(status) < 400:
                    continue
                content = resolve(spec, response)["content"]
                assert set(content) == {"application/json"}, (path, method, status)
                assert resolve(spec, content["application/json"]["schema"]) is error


def test_every_ref_resolves(spec: dict[str, Any]) -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(spec, node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)


def test_security(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    (name,) = [n for n, s in schemes.items() if s["type"] == "http" and s["scheme"] == "bearer"]
    assert spec["security"] == [{name: []}]
    assert spec["paths"]["/healthz"]["get"]["security"] == []


def test_model_download(spec: dict[str, Any]) -> None:
    op = spec["paths"]["/v1/jobs/{job}/model"]["get"]
    assert ("query", "version") in parameters(spec, "/v1/jobs/{job}/model", "get")
    ok = op["responses"]["200"]
    assert "MicroFL-Model-Version" in ok["headers"]
    assert set(ok["content"]) == {"application/octet-stream"}


def test_round_states(spec: dict[str, Any]) -> None:
    schema = resolve(spec, spec["paths"]["/v1/jobs/{job}/rounds/{round}"]["get"]["responses"]
                     ["200"]["content"]["application/json"]["schema"])
    states = {resolve(spec, s)["properties"]["state"]["const"] for s in schema["oneOf"]}
    assert states == {"open", "sealed", "committed"}

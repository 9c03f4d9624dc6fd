"""functions/Dockerfile without a Docker engine: the image is non-root and has no torch, and its CMD
starts the function FUNCTION_TARGET names. Each Service of knative/ is then started with exactly
that command line, the PORT Knative sets and the environment its manifest gives (ConfigMap and
Secret values replaced by a file store, the test Kafka broker and a test secret), and answers as
Knative's probes and event delivery expect."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from microfl import events
from microfl.local.manifests import load_documents
from microfl.local.procs import HOST, free_port, stop_process, wait_until
from microfl.tokens import issue_token

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "functions" / "Dockerfile"
KNATIVE = REPO / "knative"
VENV = "/opt/microfl"  # where the image's virtualenv lives; here, the test interpreter's


@dataclass(frozen=True)
class Instruction:
    name: str  # upper case: FROM, RUN, ...
    args: str


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """The build stages, each a list of instructions (continuations joined, comments dropped)."""
    stages: list[list[Instruction]] = []
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        logical += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if stripped.endswith("\\"):
            continue
        name, _, args = logical.partition(" ")
        logical = ""
        if name.upper() == "FROM":
            stages.append([])
        if stages:  # global ARGs before the first FROM only parametrise FROM lines
            stages[-1].append(Instruction(name.upper(), args.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages: list[list[Instruction]]) -> list[Instruction]:
    return stages[-1]


def last(stage: list[Instruction], name: str) -> str:
    found = [i.args for i in stage if i.name == name]
    assert found, f"the final stage of {DOCKERFILE} has no {name}"
    return found[-1]


def image_env(stage: list[Instruction]) -> dict[str, str]:
    """ENV of the final stage, with $VAR references resolved against the ones set before."""
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.name == "ENV":
            for item in shlex.split(instruction.args):
                key, _, value = item.partition("=")
                env[key] = value.replace("$PATH", env.get("PATH", "$PATH"))
    return env


def test_runs_as_a_numeric_non_root_user(final: list[Instruction]) -> None:
    user = last(final, "USER").split(":")
    assert user[0].isdigit() and int(user[0]) != 0, f"USER {user}: use a numeric non-root UID"
    assert all(part.isdigit() and int(part) != 0 for part in user)


def test_installs_no_torch(stages: list[list[Instruction]]) -> None:
    runs = [i.args for stage in stages for i in stage if i.name == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs, "the image must pip install the package"
    for run in installs:
        assert "torch" not in run.replace("find_spec('torch')", ""), run
        assert "[" not in run.split("pip install", 1)[1].split("&&")[0], f"no extras: {run}"
    assert any("find_spec('torch') is not None" in r for r in runs), "keep the build's torch guard"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("torch")]


def test_cmd_starts_functions_framework_from_the_environment(final: list[Instruction]) -> None:
    argv = json.loads(last(final, "CMD"))  # exec form: a JSON array
    assert argv[:2] == ["/bin/sh", "-c"] and len(argv) == 3, argv
    words = shlex.split(argv[2])
    assert words[:2] == ["exec", "functions-framework"], "exec, so signals reach gunicorn"
    options = dict(zip(words[2::2], words[3::2], strict=True))
    assert options["--target"].startswith("${FUNCTION_TARGET:?")
    assert options["--source"] == "functions/main.py"
    assert options["--port"] == "${PORT:-8080}"
    # The source is where the CMD looks for it, relative to WORKDIR.
    workdir = last(final, "WORKDIR")
    assert Instruction("COPY", "functions/main.py functions/main.py") in final
    assert final.index(Instruction("WORKDIR", workdir)) < final.index(
        Instruction("COPY", "functions/main.py functions/main.py")
    )
    env = image_env(final)
    assert env["PATH"].startswith(f"{VENV}/bin:") and env["PORT"] == "8080"


def test_dockerignore_sends_only_the_package() -> None:
    lines = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!functions/"} <= set(lines)


# --- each Service started as the image would start it -------------------------------------


def service_names() -> list[str]:
    return [d["metadata"]["name"] for d in load_documents(KNATIVE) if d["kind"] == "Service"]


def container_env(
    docs: list[dict[str, Any]], service: dict[str, Any], values: dict[str, str]
) -> dict[str, str]:
    """What Kubernetes gives the container: envFrom first, env over it. ConfigMap and Secret
    keys take their value from `values`, which must cover every key they define. knative/ ships
    no token secret: `make deploy` creates microfl-secret with MICROFL_SECRET."""
    container = service["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        [(kind, ref)] = [(k, v) for k, v in source.items() if k in ("configMapRef", "secretRef")]
        kind = "ConfigMap" if kind == "configMapRef" else "Secret"
        found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == ref["name"]]
        if (kind, ref["name"]) == ("Secret", "microfl-secret"):
            assert found == [], "knative/ must not ship a token secret (make deploy creates it)"
            found = [{"stringData": {"MICROFL_SECRET": ""}}]
        [doc] = found
        keys = set(doc.get("data", {})) | set(doc.get("stringData", {}))
        missing = keys - set(values)
        assert not missing, f"{kind} {ref['name']}: give the test a value for {sorted(missing)}"
        env.update({key: values[key] for key in keys})
    env.update({var["name"]: var["value"] for var in container.get("env", [])})
    return env


@dataclass
class Started:
    url: str
    target: str


@pytest.fixture(params=service_names())
def started(
    request: pytest.FixtureRequest, final: list[Instruction], kafka: Any, tmp_path: Path
) -> Iterator[Started]:
    docs = load_documents(KNATIVE)
    [service] = [
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == request.param
    ]
    values = {
        "MICROFL_STORE": f"file://{tmp_path / 'store'}",
        "MICROFL_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "MICROFL_SECRET": "test-image-secret-0123456789abcdef",
    }
    port = free_port()
    image = image_env(final)
    image["PATH"] = image["PATH"].replace(f"{VENV}/bin", str(Path(sys.executable).parent))
    image["PATH"] = image["PATH"].replace("$PATH", os.environ.get("PATH", "/usr/bin:/bin"))
    env = {
        "HOME": str(tmp_path),
        **image,
        **container_env(docs, service, values),
        "PORT": str(port),  # Knative's, over the image's default
    }
    argv = json.loads(last(final, "CMD"))
    log = tmp_path / f"{request.param}.log"
    with log.open("wb") as out:  # the checkout stands for WORKDIR /app (functions/main.py)
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        url = f"http://{HOST}:{port}"
        target = env["FUNCTION_TARGET"]
        path = "/healthz" if target == "ingest" else "/"
        wait_until(
            lambda: requests.get(url + path, timeout=2).status_code < 500,
            60,
            f"{request.param} as the image starts it",
            proc,
            log,
        )
        yield Started(url, target)
    finally:
        stop_process(proc, grace=5.0)


def cloudevent(event_type: str) -> dict[str, str]:
    """Headers of a binary-mode CloudEvent, as the KafkaSource and the PingSource post them."""
    return {
        "ce-specversion": "1.0",
        "ce-type": event_type,
        "ce-source": "tests/test_image.py",
        "ce-id": "test-image-1",
        "content-type": "application/json",
    }


def test_service_answers_as_knative_expects(started: Started) -> None:
    url = started.url
    if started.target == "ingest":
        health = requests.get(url + "/healthz", timeout=10)
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        # Builds the backends from the environment: 401, not a 500 configuration error.
        job = requests.get(url + "/v1/jobs/no-such-job", timeout=10)
        assert job.status_code == 401, job.text
        return
    if started.target == "console":  # pages for admins: nothing without a session
        refused = requests.get(url + "/", timeout=10)
        assert refused.status_code == 401 and "frame-ancestors 'none'" in refused.headers[
            "Content-Security-Policy"
        ]
        token = issue_token(b"test-image-secret-0123456789abcdef", "*", admin=True)
        session = requests.Session()
        signed = session.post(url + "/signin", data={"token": token}, timeout=10)
        assert signed.status_code == 200 and "Jobs" in signed.text, signed.text  # the store read
        return
    assert requests.get(url + "/", timeout=10).status_code == 405  # CloudEvent: POST only
    malformed = requests.post(
        url + "/", data=b"{}", timeout=10, headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400, malformed.text  # poison: dead-lettered, not retried
    assert malformed.json()["error"] == "invalid_event"
    # A well-formed event reaches the store named by MICROFL_STORE (a 500 would mean the
    # environment is incomplete).
    if started.target == "aggregate":
        data = {"job": "no-such-job", "round": 1, "level": 0, "node": 0}
        answer = requests.post(
            url + "/",
            data=json.dumps(data),
            timeout=30,
            headers=cloudevent(events.PARTIAL_REQUESTED),
        )
        assert answer.status_code == 400 and "no job" in answer.text, answer.text
    else:
        answer = requests.post(url + "/", data=b"{}", timeout=30, headers=cloudevent(events.PING))
        assert answer.status_code == 200, answer.text

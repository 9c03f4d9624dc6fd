"""`microfl setup`: choose the toolchains, fetch Kafka's jars, build the emulators, and say
what came from where and how long each step took (a spinner on a terminal, plain lines otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from microfl.errors import ConfigError
from microfl.local import kafkajars, toolchains

__all__ = ["run_setup"]

T = TypeVar("T")


def _step(what: str, work: Callable[[], T], cached: bool) -> tuple[T, str]:
    """Run one step; (its result, "cached" or how long it took)."""
    if cached:
        return work(), "cached"
    t0 = time.monotonic()
    with toolchains.spinner(what):
        result = work()
    return result, f"took {time.monotonic() - t0:.0f} s"


def run_setup() -> int:
    """Everything `microfl up` and the tests need, fetched or built once into .cache."""
    from microfl.local.gcs import fake_gcs_binary
    from microfl.local.kafka import _kafka_version
    from microfl.local.procs import repo_root
    from microfl.local.pubsub import emulator_binary, emulator_path

    t0 = time.monotonic()
    print(toolchains.java().describe())
    pom = repo_root() / "infra" / "local" / "pom.xml"
    libs = repo_root() / ".cache" / f"kafka-{_kafka_version(pom)}" / "libs"
    if (libs / ".complete").is_file():
        print(f"Kafka jars: {libs} (cached)")
    else:  # a progress bar of its own on a terminal
        print(f"Kafka jars: {libs} ({kafkajars.assemble(libs, _kafka_version(pom))})")
    print(f"GCS emulator: {fake_gcs_binary()}")
    try:
        go = toolchains.go()
        print(go.describe())
        built, how = _step(
            "building the Pub/Sub emulator with Go",
            lambda: emulator_binary(quiet=True),
            emulator_path().is_file(),
        )
        print(f"Pub/Sub emulator: {built} ({how})")
    except (RuntimeError, ConfigError) as exc:  # only --bus pubsub needs it
        print(f"Pub/Sub emulator: not built ({exc})")
    print(f"set-up complete in {time.monotonic() - t0:.0f} s")
    return 0

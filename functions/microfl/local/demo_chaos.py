"""`microfl demo --chaos`: SIGKILL every function and restart the Kafka broker during a run."""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["Chaos"]


class Chaos:
    """SIGKILLs each function at least once (every instance it has at that moment) while rounds
    run, and restarts the Kafka broker once, in the middle of the run. (On Pub/Sub the emulator
    is not restarted: it keeps messages in memory only, unlike the service it stands for.)"""

    def __init__(self, platform: Any, rounds: int) -> None:
        self.platform = platform
        self.broker_round = max(1, rounds // 2)
        self.events: list[str] = []
        self.pending = ["ingest", "aggregate", "finalize"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._kill_functions, daemon=True)
        self._thread.start()

    def round_started(self, r: int) -> None:
        if r == self.broker_round and self.platform.kafka is not None:
            threading.Thread(target=self._restart_broker, args=(r,), daemon=True).start()

    def _restart_broker(self, r: int) -> None:
        time.sleep(0.5)
        self.platform.kafka.kill(1)
        self.events.append(f"round {r}: Kafka broker SIGKILLed")
        time.sleep(3.0)
        self.platform.kafka.restart(1)
        self.events.append(f"round {r}: Kafka broker restarted")

    def _kill_functions(self) -> None:
        while self.pending and not self._stop.wait(0.7):
            target = self.pending[0]
            runner = self.platform.runtime.services[target]
            if runner.processes():
                runner.kill_all()
                self.events.append(f"{target} SIGKILLed")
                self.pending.pop(0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.pending:
            self.events.append(f"never found running: {', '.join(self.pending)}")

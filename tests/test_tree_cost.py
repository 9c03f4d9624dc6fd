"""The streaming tree's cost does not grow with the round: store operations and events per
update are flat from 100 to 2,000 clients (no listing per event), and the leaves are folded
while the round fills, so at seal time only the tail is left."""

from __future__ import annotations

import numpy as np
import pytest

from microfl.rounds import nodes_prefix, seal_key
from treeplay import Play

FAN_IN = 10


def run_round(n: int, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, float], int, int]:
    """(store operations and events per update, leaves built when the seal was written,
    leaves of the sealed tree)"""
    model = {"w": np.zeros(4, np.float32)}
    play = Play(model, monkeypatch, rounds=1, min_clients=n, fan_in=FAN_IN)
    at_seal: list[int] = []
    leaves = nodes_prefix("job", 1) + "00/"

    def on_create(key: str) -> None:
        if key == seal_key("job", 1):
            at_seal.append(sum(k.startswith(leaves) for k in play.store.objects))

    play.store.on_create = on_create
    play.store.ops.clear()
    events = 0
    rng = np.random.default_rng(n)
    for i in range(n):  # uploads and event deliveries interleave, in order
        update = {"w": rng.standard_normal(4).astype(np.float32)}
        assert play.post(1, f"c{i:05d}", update, 1 + i % 7) == 202
        events += len(play.queue)
        while play.queue:
            play.step(None)
            events += len(play.queue)
    assert play.store.exists("jobs/job/rounds/00000001/record.json")
    per_update = {op: count / n for op, count in play.store.ops.items()}
    per_update["events"] = events / n
    return per_update, at_seal[0], -(-n // FAN_IN)


def test_store_operations_and_events_per_update_are_flat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small, _, _ = run_round(100, monkeypatch)
    large, built, leaves = run_round(2000, monkeypatch)
    for op in sorted(set(small) | set(large)):
        if op == "list":  # the seal and the commit list the round once: less per update
            assert large[op] <= small[op], (op, small, large)
            continue
        assert large[op] <= 1.2 * small[op], (op, small, large)
    assert large["list"] * 2000 <= 10, large  # a few listings per round, none per event
    assert built >= leaves - 1, f"{built} of {leaves} leaves folded before the seal"

#!/usr/bin/env python
"""In-process commit latency, async vs sync side by side: time from the K-th upload (its POST
call) to the version/round committed, FileStore in a temp dir, events delivered in order as they
are published. Usage: PYTHONPATH=functions python load/bench/async_commit_inprocess.py PARAMS K"""

import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from microfl import aggregate, finalize, ingest
from microfl.backends import Backends
from microfl.bus import MemoryBus
from microfl.jobs import JobSpec, create_job
from microfl.serde import tensors_to_safetensors
from microfl.store import FileStore
from microfl.tokens import issue_token

SECRET = b"bench-secret-0123456789-abcdefghijklmnop"
params, k = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
model = {"w": rng.standard_normal(params).astype(np.float32)}


def drain(b):
    while b.bus.events:
        topic, event, _ = b.bus.events.pop(0)
        if topic == "microfl.aggregate":
            aggregate.handle(b, event)
        elif topic == "microfl.finalize":
            finalize.handle(b, event)


def run(mode):
    with tempfile.TemporaryDirectory() as d:
        store = FileStore(Path(d))
        b = Backends(store, MemoryBus(), SECRET, time.time)
        opts = dict(mode="async", buffer=k) if mode == "async" else dict(min_clients=k)
        spec = JobSpec.for_model("j", model, created_at=time.time(), rounds=1, fan_in=10, **opts)
        create_job(store, spec, tensors_to_safetensors(model))
        bodies = []
        for i in range(k):
            u = {"w": (model["w"] + rng.standard_normal(params).astype(np.float32) * 0.01)}
            meta = {"num_examples": str(i + 1)}
            if mode == "async":
                meta["base_version"] = "0"
            bodies.append((f"c{i:04d}", tensors_to_safetensors(u, meta)))
        for i, (c, data) in enumerate(bodies):
            token = issue_token(SECRET, "j", c, now=time.time())
            if i == k - 1:
                t0 = time.perf_counter()
            if mode == "async":
                s, _ = ingest.post_async_update(b, "j", token, io.BytesIO(data).read, len(data))
            else:
                s, _ = ingest.post_update(b, "j", 1, token, io.BytesIO(data).read, len(data))
            assert s == 202
            drain(b)
        assert store.exists("jobs/j/rounds/00000001/record.json")
        return time.perf_counter() - t0


run("async")
run("sync")  # warm up (numba compile, caches)
res = {m: sorted(run(m) for _ in range(5)) for m in ("async", "sync")}
for m, ts in res.items():
    runs = ", ".join(f"{t * 1000:.0f}" for t in ts)
    print(
        f"{m}: K={k}, {params:,} params: K-th upload -> committed, median "
        f"{ts[2] * 1000:.0f} ms (runs {runs})"
    )

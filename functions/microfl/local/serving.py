"""Knative Serving in miniature, for one Service: a stable URL in front of 0..max-scale instances
of a function, added when the requests in flight exceed the per-instance target, removed after
an idle window, and cold-started by the next request when there are none (scale to zero).

Like Knative's activator, the proxy holds a request while an instance starts; like the
queue-proxy, it enforces containerConcurrency and the request timeout (504), and answers 502
when an instance dies under a request, which event delivery then retries."""

from __future__ import annotations

import http.client
import io
import json
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from microfl.local.instance import FunctionProcess
from microfl.local.procs import HOST

__all__ = ["Scale", "ServiceRunner"]

LOG = logging.getLogger("microfl.runtime")

HOP_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "host",
    "content-length",
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client hung up (say its request timed out): nothing to report
        super().handle_error(request, client_address)


@dataclass(frozen=True)
class Scale:
    """The Service's autoscaling settings (annotations and spec of knative/*.yaml)."""

    min_scale: int = 0
    max_scale: int = 1  # 0: no limit
    target: float = 100.0  # concurrent requests per instance the autoscaler aims at
    container_concurrency: int = 0  # hard limit per instance; 0: no limit
    timeout_seconds: float = 300.0
    idle_window: float = 30.0  # seconds without requests before an instance is removed


@dataclass
class _Instance:
    fn: FunctionProcess
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ServiceRunner:
    def __init__(
        self,
        name: str,
        target: str,
        scale: Scale,
        env: dict[str, str],
        logdir: Path,
        source: Path | None = None,
    ) -> None:
        self.name, self.target, self.scale = name, target, scale
        self.env, self.logdir, self.source = env, logdir, source
        self.instances: list[_Instance] = []
        self.peak_instances = 0
        self.cold_starts = 0
        self._cond = threading.Condition()
        self._starting = 0
        self._waiting = 0  # requests held for want of a free instance: demand, like the activator's
        self._serial = 0
        self._stopping = threading.Event()
        self._server = _Server((HOST, 0), self._handler_class())
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}"

    @property
    def max_instances(self) -> int:
        return self.scale.max_scale or 1_000_000

    def processes(self) -> list[FunctionProcess]:
        with self._cond:
            return [i.fn for i in self.instances]

    def start(self) -> ServiceRunner:
        for _ in range(self.scale.min_scale):
            self._starting += 1
            self._add_instance()
        for loop in (self._server.serve_forever, self._autoscale):
            thread = threading.Thread(target=loop, daemon=True, name=f"{self.name}-{loop.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._cond:
            instances, self.instances = self.instances, []
            self._cond.notify_all()
        for inst in instances:
            inst.fn.stop()

    def kill_all(self) -> None:
        """SIGKILL every instance (fault injection); the next request cold-starts one."""
        with self._cond:
            instances = list(self.instances)
        for inst in instances:
            inst.fn.kill()

    # --- instances --------------------------------------------------------------------------

    def _add_instance(self) -> None:
        """Start one instance (blocking) and put it in the pool."""
        with self._cond:
            self._serial += 1
            fn = FunctionProcess(
                self.target,
                self.env,
                self.logdir,
                log_name=f"{self.name}-{self._serial}",
                source=self.source,
            )
        try:
            fn.start()
        except (RuntimeError, TimeoutError) as exc:
            LOG.warning("%s: instance failed to start: %s", self.name, exc)
            with self._cond:
                self._starting -= 1
                self._cond.notify_all()
            return
        with self._cond:
            self._starting -= 1
            stopped = self._stopping.is_set()  # stop() ran while this one started: not ours
            if not stopped:
                self.instances.append(_Instance(fn))
                self.peak_instances = max(self.peak_instances, len(self.instances))
            self._cond.notify_all()
        if stopped:
            fn.stop()

    def _spawn(self, count: int) -> None:
        """Start count instances in the background (caller holds the lock)."""
        room = self.max_instances - len(self.instances) - self._starting
        for _ in range(max(0, min(count, room))):
            self._starting += 1
            threading.Thread(target=self._add_instance, daemon=True).start()

    def _acquire(self, deadline: float) -> _Instance | None:
        limit = self.scale.container_concurrency or 1_000_000
        with self._cond:
            while not self._stopping.is_set():
                self.instances = [i for i in self.instances if i.fn.alive]
                free = [i for i in self.instances if i.in_flight < limit]
                if free:
                    inst = min(free, key=lambda i: i.in_flight)
                    inst.in_flight += 1
                    inst.last_used = time.monotonic()
                    return inst
                if not self.instances and not self._starting:
                    self.cold_starts += 1
                if not self._starting:
                    self._spawn(1)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._waiting += 1
                try:
                    self._cond.wait(min(remaining, 0.5))
                finally:
                    self._waiting -= 1
        return None

    def _release(self, inst: _Instance) -> None:
        with self._cond:
            inst.in_flight -= 1
            inst.last_used = time.monotonic()
            self._cond.notify_all()

    def _autoscale(self) -> None:
        while not self._stopping.wait(0.2):
            with self._cond:
                self.instances = [i for i in self.instances if i.fn.alive]
                load = sum(i.in_flight for i in self.instances) + self._waiting
                want = math.ceil(load / self.scale.target) if load else 0
                want = min(max(want, self.scale.min_scale), self.max_instances)
                have = len(self.instances) + self._starting
                if want > have:
                    self._spawn(want - have)
                idle = [
                    i
                    for i in self.instances
                    if i.in_flight == 0 and time.monotonic() - i.last_used >= self.scale.idle_window
                ]
                victim = (
                    idle[0]
                    if idle and len(self.instances) > max(want, self.scale.min_scale)
                    else None
                )
                if victim is not None:
                    self.instances.remove(victim)
            if victim is not None:
                victim.fn.stop()

    # --- the proxy ---------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        runner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each answer waits for a delayed ACK (~40 ms)

            def log_message(self, *args: object) -> None:
                pass

            def _proxy(self) -> None:
                try:
                    body, length = _request_body(self.headers, self.rfile)
                    sent = [0]
                    status, headers, data = runner.forward(
                        self.command, self.path, dict(self.headers), body, length, sent
                    )
                except ValueError as exc:  # bad framing, or a path http.client refuses
                    status, headers, data = _error(400, f"malformed request: {exc}", "bad_request")
                    sent, length = [0], 1
                if sent[0] < length:  # answered before the body was all read (say a 413)
                    self.close_connection = True
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP_HEADERS:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _proxy
            do_PATCH = do_OPTIONS = do_TRACE = _proxy

        return Handler

    def forward(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: io.BufferedIOBase,
        length: int,
        sent: list[int],
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Stream the body to an instance while waiting for its answer, like Knative's
        queue-proxy: an instance that refuses early (413) is answered at once, and the body is
        never held in memory here. sent[0] counts the body bytes passed on."""
        deadline = time.monotonic() + self.scale.timeout_seconds
        inst = self._acquire(deadline)
        if inst is None:
            return _error(503, "no instance became ready in time")
        conn = http.client.HTTPConnection(
            HOST, inst.fn.port, timeout=max(0.1, deadline - time.monotonic())
        )
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in headers.items():
                if k.lower() not in HOP_HEADERS:
                    conn.putheader(k, v)
            conn.putheader("Content-Length", str(length))
            conn.endheaders()
            pump = threading.Thread(target=_pump, args=(body, conn, length, sent), daemon=True)
            pump.start()
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        except TimeoutError:
            return _error(504, f"{self.name} did not answer within {self.scale.timeout_seconds}s")
        except http.client.InvalidURL as exc:
            return _error(400, f"malformed request path: {exc}", "bad_request")
        except (OSError, http.client.HTTPException) as exc:
            return _error(502, f"{self.name} instance failed under the request: {exc}")
        finally:
            conn.close()
            self._release(inst)


def _request_body(headers: Message, rfile: io.BufferedIOBase) -> tuple[io.BufferedIOBase, int]:
    """The body to pass on and its length; a chunked body is de-chunked first."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        data = bytearray()
        while True:
            line = rfile.readline().split(b";")[0].strip()
            if not line:
                raise ValueError("a chunked body ended without its last chunk")
            size = int(line, 16)
            if size == 0:
                while rfile.readline().strip():  # trailers
                    pass
                return io.BytesIO(bytes(data)), len(data)
            data += rfile.read(size)
            rfile.readline()
    raw = headers.get_all("Content-Length") or ["0"]
    if len(raw) != 1 or not raw[0].strip().isascii() or not raw[0].strip().isdigit():
        raise ValueError(f"Content-Length {', '.join(raw)!r} is not one non-negative integer")
    return rfile, int(raw[0])


def _pump(
    body: io.BufferedIOBase, conn: http.client.HTTPConnection, length: int, sent: list[int]
) -> None:
    try:
        while sent[0] < length:
            chunk = body.read(min(65536, length - sent[0]))
            if not chunk:
                return
            conn.send(chunk)
            sent[0] += len(chunk)
    except (OSError, ValueError):  # the instance answered and closed, or the client went away
        return


def _error(
    status: int, message: str, code: str = "unavailable"
) -> tuple[int, list[tuple[str, str]], bytes]:
    body = json.dumps({"error": code, "message": message}).encode()
    return status, [("Content-Type", "application/json")], body

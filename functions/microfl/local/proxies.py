"""Fault-injecting proxies for the local fault scenarios: a TCP proxy that slows every chunk
(a slow object store), and an HTTP proxy in front of a function that delays, duplicates and
reorders the CloudEvents delivered to it (at-least-once delivery at its worst)."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from microfl.local.procs import HOST

__all__ = ["EventChaosProxy", "SlowTcpProxy"]


class SlowTcpProxy:
    """127.0.0.1:port -> upstream, sleeping `delay` seconds before forwarding each chunk."""

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream, self.delay = upstream, delay
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=30)
            except OSError:
                client.close()
                continue
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                time.sleep(self.delay)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


class EventChaosProxy:
    """Forwards each POSTed event to `sink` after a random delay, and with probability
    `duplicate` posts it once more later, out of order with what follows. Answers with the
    sink's answer to the first copy, so delivery semantics upstream stay those of Knative."""

    def __init__(
        self, sink: str, seed: int, duplicate: float = 0.5, max_delay: float = 0.3
    ) -> None:
        self.sink, self.duplicate, self.max_delay = sink, duplicate, max_delay
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.duplicates = 0
        self._server = ThreadingHTTPServer((HOST, 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}"

    def _draw(self) -> tuple[float, float | None]:
        with self.lock:
            delay = self.rng.uniform(0, self.max_delay)
            again = self.rng.uniform(0.2, 2.0) if self.rng.random() < self.duplicate else None
            self.duplicates += again is not None
            return delay, again

    def _post(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        request = urllib.request.Request(self.sink, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=300) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError as exc:
            return 502, str(exc).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "connection")
                }
                delay, again = proxy._draw()
                time.sleep(delay)
                status, data = proxy._post(headers, body)
                if again is not None:
                    threading.Timer(again, proxy._post, args=(headers, body)).start()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

"""Raw HTTP for hostile-input tests: requests that are sent exactly as written (requests/urllib3
would rewrite paths and framing), with declared lengths, extra head lines, half-closes."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class NoAnswer(AssertionError):
    """The server closed the connection or stayed silent instead of answering."""


def raw_request(
    base: str,
    method: str,
    target: bytes,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    *,
    declared_length: int | str | None = None,
    extra_head: bytes = b"",
    trailing: bytes = b"",
    half_close: bool = False,
    timeout: float = 5.0,
) -> Answer:
    """One HTTP/1.1 request written byte for byte: the target is not normalised, the
    Content-Length may lie (declared_length), `trailing` is sent after the body (a large carry
    that the server may refuse to read), and half_close ends our side so a server reading a body
    that never comes sees EOF. A Content-Length or Transfer-Encoding in `headers` replaces the
    computed one. Returns the first answer, or raises NoAnswer."""
    host, port = base.removeprefix("http://").split(":")
    head = [f"{method} ".encode() + target + b" HTTP/1.1", b"Host: " + host.encode()]
    headers = {"Connection": "close", **(headers or {})}
    for k, v in headers.items():
        head.append(f"{k}: {v}".encode())
    if not {k.lower() for k in headers} & {"content-length", "transfer-encoding"}:
        length = len(body) + len(trailing) if declared_length is None else declared_length
        head.append(f"Content-Length: {length}".encode())
    request = b"\r\n".join(head) + b"\r\n" + extra_head + b"\r\n" + body
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(request)
            if trailing:
                sock.sendall(trailing)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered early and stopped reading: read its answer
            pass
        return _read_answer(sock, timeout)


def _read_answer(sock: socket.socket, timeout: float) -> Answer:
    try:
        return _answer(sock)
    except TimeoutError:
        # Say what the server does once the body it waits for ends, and let it write that
        # answer rather than fail on a closed socket.
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            late = _answer(sock)
            then = f"after the client ended its body it answered {late.status}: {late.body[:120]!r}"
        except (OSError, NoAnswer) as exc:
            then = f"nor after the client ended its body ({exc})"
        raise NoAnswer(f"no answer within {timeout}s; {then}") from None
    except (NoAnswer, ConnectionResetError) as exc:
        # The server's thread may still be printing its traceback. On CPython 3.11 traceback
        # printing parses source with `ast`, whose recursion bookkeeping is shared between
        # threads (python/cpython#106905): let it finish before pytest formats our failure.
        time.sleep(0.5)
        raise NoAnswer(f"connection closed without an answer: {exc}") from None


def _answer(sock: socket.socket) -> Answer:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise NoAnswer(f"got {buf[:200]!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Answer(status, headers, rest[:length] if length >= 0 else rest)

"""Clients for driving the public edge as an attacker would: exact request
lines (no client-side normalisation), another loopback source address, slow
senders, absurd bodies; and the service's memory read on the host."""
from __future__ import annotations

import http.client
import socket
import ssl
import time

MAX_BODY = 6553500  # the deployment's default max_request_size


def tls_context(ca: str | None = None) -> ssl.SSLContext:
    if ca:
        return ssl.create_default_context(cafile=ca)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
            source: str = "127.0.0.1", tls: bool = True, timeout: float = 60) -> tuple[int, dict, bytes]:
    """One request with the path sent byte for byte as given."""
    if tls:
        conn = http.client.HTTPSConnection("127.0.0.1", port, source_address=(source, 0), context=tls_context(),
                                           timeout=timeout)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, source_address=(source, 0), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    out = fn(*args, **kwargs)
    return time.monotonic() - t0, out


def many_part_multipart(size: int = MAX_BODY - 1000) -> tuple[bytes, dict]:
    """A multipart body of one-byte parts, as many as fit under the size cap."""
    boundary = "b0undary"
    parts, total, i = [], 0, 0
    while True:
        part = f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n'.encode()
        if total + len(part) + len(boundary) + 8 > size:
            break
        parts.append(part)
        total += len(part)
        i += 1
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def many_field_form(size: int = MAX_BODY - 1000) -> tuple[bytes, dict]:
    """A form-urlencoded body of tiny fields up to the size cap."""
    return b"a=1&" * (size // 4), {"Content-Type": "application/x-www-form-urlencoded"}


def slow_header_client(port: int, pause: float = 5.0, limit: float = 60.0, tls: bool = True) -> float:
    """Sends a request header one line every `pause` seconds and never ends it;
    returns the seconds until the server closed the connection (capped at limit)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=limit)
    sock = tls_context().wrap_socket(raw) if tls else raw
    t0 = time.monotonic()
    try:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n")
        sock.settimeout(pause)
        n = 0
        while time.monotonic() - t0 < limit:
            try:
                if sock.recv(4096) == b"":
                    break  # closed by the server
                break  # any answer (408) ends the header too
            except (socket.timeout, TimeoutError):
                pass
            except OSError:
                break
            try:
                sock.sendall(f"X-Slow-{n}: {n}\r\n".encode())
            except OSError:
                break
            n += 1
        return time.monotonic() - t0
    finally:
        sock.close()


def service_memory(host) -> dict:
    """Resident and peak memory (MiB) of TorchServe's JVM and each worker."""
    out = host.ssh("for p in $(ps -e -o unit=,pid= | awk '$1 == \"torchserve.service\" {print $2}');"
                   " do echo $p $(cat /proc/$p/comm) $(awk '/^VmHWM|^VmRSS/{print $2}' /proc/$p/status | tr '\\n' ' ');"
                   " done").stdout
    mem = {"java": None, "workers": []}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        hwm, rss = int(fields[2]) // 1024, int(fields[3]) // 1024
        if fields[1] == "java":
            mem["java"] = {"rss": rss, "hwm": hwm}
        elif fields[1].startswith("python"):
            mem["workers"].append({"pid": int(fields[0]), "rss": rss, "hwm": hwm})
    return mem

#!/usr/bin/env python3
"""Figures of the public edge under hostile clients, on an already deployed
sandbox host with TLS (e.g. the deployment tests' host kept with KEEP_HOSTS=1):

    python3 benchmarks/edge_figures.py [--state-dir .sandbox/pytest --prefix pytest-host]

Prints, for many-part multipart and many-field form bodies at the size cap
(one alone, then 8 in parallel with a good request from another address
meanwhile): status, seconds, JVM and worker memory before/after; a flood of
/ping from 127.0.0.2 (16 keepalive connections) with the statuses it got; how long a
client sending one header line every 5 s keeps its connection; and what the
encoded-path family is answered.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests/deploy"))

from deploy_helpers import Host  # noqa: E402
from edge_helpers import (many_field_form, many_part_multipart, request, service_memory,  # noqa: E402
                          slow_header_client, timed, tls_context)

PHOTO = (REPO / "files/samples/tshirt4.jpg").read_bytes()


def good(port: int, source: str = "127.0.0.1") -> tuple[float, int]:
    seconds, (status, _, _) = timed(request, port, "PUT", "/predictions/fmnist", PHOTO, source=source)
    return round(seconds, 2), status


def bodies(host: Host, port: int) -> None:
    for name, (body, headers) in {"many-part multipart": many_part_multipart(),
                                  "many-field form": many_field_form()}.items():
        before = service_memory(host)
        seconds, (status, _, data) = timed(request, port, "POST", "/predictions/fmnist", body, headers,
                                           source="127.0.0.3")
        print(f"{name} ({len(body)} bytes), alone: {status} in {seconds:.2f} s: {data[:100]!r}")
        with ThreadPoolExecutor(9) as pool:
            t0 = time.monotonic()
            bad = [pool.submit(timed, request, port, "POST", "/predictions/fmnist", body, headers,
                               source="127.0.0.3") for _ in range(8)]
            time.sleep(0.3)
            meanwhile = pool.submit(good, port, "127.0.0.4")
            answers = [(round(f.result()[0], 2), f.result()[1][0]) for f in bad]
            total = time.monotonic() - t0
        after = service_memory(host)
        print(f"  8 in parallel: {answers}, all done in {total:.1f} s; good request meanwhile: {meanwhile.result()}")
        print(f"  memory MiB before: {before}\n  memory MiB after:  {after}")
        print(f"  good request after: {good(port, '127.0.0.4')}")


def flood(port: int) -> None:
    """16 keepalive connections from 127.0.0.2, 60 GET /ping each, as fast as they go."""
    def client(_):
        conn = http.client.HTTPSConnection("127.0.0.1", port, source_address=("127.0.0.2", 0),
                                           context=tls_context(), timeout=30)
        statuses = []
        try:
            for _ in range(60):
                conn.request("GET", "/ping")
                r = conn.getresponse()
                r.read()
                statuses.append(r.status)
        finally:
            conn.close()
        return statuses
    with ThreadPoolExecutor(16) as pool:
        t0 = time.monotonic()
        futures = [pool.submit(client, i) for i in range(16)]
        time.sleep(0.3)
        meanwhile = good(port, "127.0.0.1")
        counts = collections.Counter(s for f in futures for s in f.result())
    print(f"flood 960 x GET /ping from 127.0.0.2 on 16 keepalive connections: {dict(counts)} in"
          f" {time.monotonic() - t0:.1f} s; prediction from 127.0.0.1 meanwhile: {meanwhile}")


def paths(port: int) -> None:
    for path in ["/predictions/zz/..%2Ffmnist", "/explanations/fmnist/..%2F..%2Fpredictions%2Ffmnist",
                 "/predictions/fmnist%2F..%2F..%2Fmodels", "/predictions/%2e%2e/models",
                 "/predictions/fmnist/%252e%252e%252fmodels", "/predictions/zz/../fmnist"]:
        status, _, data = request(port, "PUT", path, PHOTO)
        print(f"PUT {path}: {status} {data[:110]!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dir", default=str(REPO / ".sandbox/pytest"))
    ap.add_argument("--prefix", default="pytest-host")
    args = ap.parse_args()
    sandbox = [sys.executable, str(REPO / "sandbox/hosts.py"), "--state-dir", args.state_dir, "--prefix", args.prefix]
    name = f"{args.prefix}1"
    info = json.loads(subprocess.run(sandbox + ["info", name], check=True, capture_output=True, text=True).stdout)
    host = Host(name, info["ports"], info["ssh"], info["inventory"])
    port = info["ports"]["torchserve_nginx_https_port"]
    paths(port)
    bodies(host, port)
    flood(port)
    print(f"slow header client (a line every 5 s) kept its connection {slow_header_client(port):.1f} s")


if __name__ == "__main__":
    main()

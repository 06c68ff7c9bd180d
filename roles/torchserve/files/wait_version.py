#!/usr/bin/python3
"""Wait until a model version registered without ?synchronous (which would
block one of TorchServe's event-loop threads, and the inference connections
on it, for the whole load) has its workers READY.

    wait_version.py SOCKET MODEL VERSION WORKERS DEADLINE_SECONDS

Exit 0 when READY; 1 with one line saying why not: a worker process died
while loading (TorchServe restarts it with a new PID and would retry for ever),
the version disappeared, or the deadline passed.
"""
import http.client
import json
import socket
import sys
import time
import urllib.parse


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def describe(sock: str, model: str, version: str) -> tuple[int, object]:
    c = UnixConnection(sock)
    c.request("GET", f"/models/{urllib.parse.quote(model)}/{urllib.parse.quote(version)}")
    r = c.getresponse()
    body = r.read().decode()
    return r.status, (json.loads(body) if r.status == 200 else body)


def main(sock: str, model: str, version: str, workers: int, deadline: float) -> str | None:
    end = time.monotonic() + deadline
    pids: dict[str, int] = {}
    while True:
        status, body = describe(sock, model, version)
        if status != 200:
            return f"version {version} is no longer registered (HTTP {status})"
        ready = 0
        for w in body[0]["workers"]:
            pid = int(w.get("pid", -1))
            if pid > 0 and pids.get(w["id"], pid) != pid:
                return (f"a worker process died while loading (worker {w['id']} restarted: PID {pids[w['id']]} ->"
                        f" {pid}); see /var/log/torchserve/torchserve.log")
            if pid > 0:
                pids[w["id"]] = pid
            ready += w["status"] == "READY"
        if ready >= workers:
            return None
        if time.monotonic() > end:
            return f"{ready} of {workers} workers READY within the readiness deadline ({deadline:.0f} s)"
        time.sleep(0.5)


if __name__ == "__main__":
    why = main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    if why:
        print(why)
    sys.exit(1 if why else 0)

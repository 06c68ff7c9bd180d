#!/usr/bin/env python3
"""Deployment figures on a fresh sandbox host (make bench).

Prints: fresh converge time, second-run time and its changed count, --check
run time, time from `systemctl restart torchserve` to the first successful
prediction through nginx, and the resident memory of the service (JVM +
workers). The host is created here and destroyed at the end (KEEP_HOSTS=1
keeps it).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".sandbox/bench"
SANDBOX = [sys.executable, str(REPO / "sandbox/hosts.py"), "--state-dir", str(STATE), "--prefix", "bench-host"]
HOST = "bench-host1"
PHOTO = (REPO / "files/samples/tshirt4.jpg").read_bytes()


def playbook(*args: str) -> tuple[float, dict]:
    t0 = time.monotonic()
    r = subprocess.run(["ansible-playbook", "-i", str(STATE / "inventory.yml"), "playbooks/deploy.yml", *args],
                       cwd=REPO, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"ansible-playbook {' '.join(args)} failed:\n{r.stdout[-4000:]}{r.stderr[-2000:]}")
    line = next(x for x in r.stdout.splitlines() if x.startswith(HOST) and "changed=" in x)
    return seconds, {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def main() -> None:
    subprocess.run(SANDBOX + ["create", "--count", "1"], check=True)
    try:
        info = json.loads(subprocess.run(SANDBOX + ["info", HOST], check=True, capture_output=True, text=True).stdout)
        ssh = info["ssh"]
        url = f"http://127.0.0.1:{info['ports']['torchserve_nginx_http_port']}/predictions/fmnist"

        fresh, fresh_recap = playbook()
        second, second_recap = playbook()
        check, check_recap = playbook("--check", "--diff")

        # Restart -> first good prediction, polled every 50 ms from outside.
        t0 = time.monotonic()
        subprocess.run(ssh + ["systemctl restart torchserve"], check=True)
        while True:
            try:
                r = requests.put(url, data=PHOTO, timeout=5)
                if r.status_code == 200 and r.json().get("label") == "T-shirt/top":
                    break
            except requests.RequestException:
                pass
            if time.monotonic() - t0 > 300:
                sys.exit("no prediction within 300 s of the restart")
            time.sleep(0.05)
        restart = time.monotonic() - t0

        for _ in range(20):  # settle the workers' memory with a few requests
            requests.put(url, data=PHOTO, timeout=30).raise_for_status()
        ps = subprocess.run(ssh + ["ps -e -o unit=,rss=,comm="], check=True, capture_output=True,
                            text=True).stdout.splitlines()
        procs = [(int(rss), comm) for unit, rss, comm in (p.split(None, 2) for p in ps) if unit == "torchserve.service"]
        total = sum(rss for rss, _ in procs)

        print("\n== deployment figures (one sandbox host, 2-core machine)")
        print(f"fresh converge:        {fresh:6.1f} s   (changed={fresh_recap['changed']})")
        print(f"second run:            {second:6.1f} s   (changed={second_recap['changed']})")
        print(f"--check --diff run:    {check:6.1f} s   (changed={check_recap['changed']})")
        print(f"restart -> prediction: {restart:6.1f} s   (systemctl restart torchserve to first 200 via nginx)")
        print(f"service RSS:           {total / 1024:6.0f} MiB = " +
              " + ".join(f"{comm} {rss / 1024:.0f}" for rss, comm in sorted(procs, reverse=True)))
    finally:
        if not os.environ.get("KEEP_HOSTS"):
            subprocess.run(SANDBOX + ["destroy"])


if __name__ == "__main__":
    main()

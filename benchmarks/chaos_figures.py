#!/usr/bin/env python3
"""Chaos figures on one sandbox host (make chaos).

Deploys a sandbox host (TLS on, as the deployment tests do), runs the chaos
scenario of tests/deploy/chaos_scenario.py (the one the chaos test asserts)
and prints per event: requests, failed requests, time to the next 200,
seconds until every worker is READY again, retried stale keep-alive requests
and the failures by class. The host is destroyed at the end (KEEP_HOSTS=1
keeps it; a re-run then reuses it). CHAOS_CLIENTS, CHAOS_SEED override the
defaults.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests/deploy"))
from chaos_scenario import Chaos  # noqa: E402

STATE = REPO / ".sandbox/chaos"
SANDBOX = [sys.executable, str(REPO / "sandbox/hosts.py"), "--state-dir", str(STATE), "--prefix", "chaos-host"]
HOST = "chaos-host1"


def main() -> None:
    subprocess.run(SANDBOX + ["create", "--count", "1"], check=True)
    try:
        info = json.loads(subprocess.run(SANDBOX + ["info", HOST], check=True, capture_output=True, text=True).stdout)
        r = subprocess.run(["ansible-playbook", "-i", info["inventory"], "playbooks/deploy.yml",
                            "-e", "torchserve_nginx_tls_enabled=true"], cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"ansible-playbook failed:\n{r.stdout[-4000:]}{r.stderr[-2000:]}")
        pem = subprocess.run(info["ssh"] + ["cat /etc/nginx/tls/torchserve.crt"], check=True, capture_output=True,
                             text=True).stdout
        with tempfile.NamedTemporaryFile("w", suffix=".crt") as ca:
            ca.write(pem)
            ca.flush()
            seed = os.environ.get("CHAOS_SEED")
            chaos = Chaos(info["ssh"], SANDBOX, HOST,
                          f"https://127.0.0.1:{info['ports']['torchserve_nginx_https_port']}/predictions/fmnist", ca.name,
                          clients=int(os.environ.get("CHAOS_CLIENTS", 64)),
                          seed=int(seed) if seed else None)
            res = chaos.run()
        print(f"\n== chaos figures: {res.clients} keep-alive clients through nginx (TLS), {res.total_requests} "
              f"requests in {res.seconds:.0f} s (load generator CPU {res.client_cpu:.0f} s), {res.workers} workers, "
              f"batch size {res.batch_size}, seed {res.seed}")
        print(res.table())
        for ev in res.events:
            if ev.detail:
                print(f"  {ev.name}: {ev.detail}")
        a = res.after
        print(f"after all events: torchserve {a['active']}, nginx {a['nginx_active']}, "
              f"java {len(a['java'])} (in unit {len(a['java_in_unit'])}), wrappers {len(a['wrappers'])}, "
              f"workers {len(a['workers'])}, nginx masters {len(a['nginx_masters'])}, "
              f"digests {'unchanged' if a['digests'] == res.before['digests'] else 'CHANGED'}")
    finally:
        if not os.environ.get("KEEP_HOSTS"):
            subprocess.run(SANDBOX + ["destroy"])


if __name__ == "__main__":
    main()

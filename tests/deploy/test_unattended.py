"""Runs for months unattended: bounded logs, memory limits, a tight sandbox,
a temp area that cannot pile up, and a model version bump that really lands.
All on the session's deployed sandbox host, checked from outside."""
import concurrent.futures
import json
import re
import time
from pathlib import Path

import pytest
import requests
import yaml

from deploy_helpers import REPO, recap

pytestmark = pytest.mark.deploy
DEFAULTS = yaml.safe_load((REPO / "roles/torchserve/defaults/main.yml").read_text())
MODELS = yaml.safe_load((REPO / "playbooks/vars/fmnist.yml").read_text())["torchserve_models"]
PHOTO = (REPO / "files/samples/tshirt4.jpg").read_bytes()
# Largest TorchServe log growth (files + the unit's journal) per request at the default level.
MAX_LOG_BYTES_PER_REQUEST = 2.0
REQUESTS = 5000

def log_bytes(host) -> tuple[int, int]:
    """(bytes of the log folder, bytes of the unit's journal messages)."""
    out = host.ssh("du -sb /var/log/torchserve | cut -f1; journalctl -u torchserve -o cat --no-pager | wc -c").stdout.split()
    return int(out[0]), int(out[1])


def drive(host, ca, n: int) -> dict:
    """n predictions through nginx, 8 at a time; count of each status."""
    url = f"{host.https}/predictions/fmnist"

    def one(_):
        return requests.put(url, data=PHOTO, verify=ca, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(n)))
    return {c: codes.count(c) for c in set(codes)}


def wait_ready(host, ca, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = requests.put(f"{host.https}/predictions/fmnist", data=PHOTO, verify=ca, timeout=10)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError("no prediction through nginx within %d s" % timeout)


def test_logs_grow_by_under_two_bytes_per_request(deployed_host, host_ca):
    before = log_bytes(deployed_host)
    codes = drive(deployed_host, host_ca, REQUESTS)
    after = log_bytes(deployed_host)
    files, journal = after[0] - before[0], after[1] - before[1]
    per_request = (files + journal) / REQUESTS
    print(f"\n{REQUESTS} requests: log files +{files} B, journal +{journal} B, {per_request:.3f} B/request")
    assert codes == {200: REQUESTS}
    assert per_request < MAX_LOG_BYTES_PER_REQUEST, (files, journal)
    # One home: nothing of TorchServe's bundled layout, and the file keeps the start events.
    listing = deployed_host.ssh("ls /var/log/torchserve").stdout.split()
    assert set(listing) <= {"torchserve.log"} | {f"torchserve.{i}.log" for i in range(1, 10)}, listing
    log = deployed_host.ssh("cat /var/log/torchserve/torchserve.log").stdout
    assert "Model fmnist loaded." in log and "Management API bind to" in log


def test_log_cap_holds_with_debug_logging(deployed_host, host_ca):
    cap_mb = 2
    try:
        r = deployed_host.playbook("-e", f"torchserve_log_max_size_mb={cap_mb}", "-e", "torchserve_log_debug=true")
        assert r.returncode == 0, r.stdout[-4000:]
        before = log_bytes(deployed_host)
        assert drive(deployed_host, host_ca, REQUESTS) == {200: REQUESTS}
        sizes = dict(line.split()[::-1] for line in
                     deployed_host.ssh("cd /var/log/torchserve && stat -c '%s %n' *").stdout.splitlines())
        total = sum(int(s) for s in sizes.values())
        journal = log_bytes(deployed_host)[1] - before[1]
        print(f"\ncap {cap_mb} MiB, debug on, {REQUESTS} requests: {len(sizes)} files, {total} B, journal +{journal} B")
        # Debug logging really logs every request, and wrote several times the cap.
        log = deployed_host.ssh("cat /var/log/torchserve/torchserve.log").stdout
        assert 'ACCESS_LOG - 127.0.0.1 "PUT /predictions/fmnist' in log
        assert "torchserve.9.log" in sizes, sorted(sizes)
        # Each file may pass its tenth of the cap by the one event that triggered the roll.
        assert total <= cap_mb * 1024 * 1024 + len(sizes) * 8192, sizes
        assert len(sizes) <= 10
        assert journal < 20000
    finally:
        restored = deployed_host.playbook()
        assert restored.returncode == 0, restored.stdout[-4000:]


def test_unit_bounds_and_sandbox_scores(deployed_host):
    props = dict(line.split("=", 1) for line in deployed_host.ssh(
        "systemctl show torchserve -p OOMPolicy -p MemoryMax -p MemoryHigh -p TasksMax -p KillMode").stdout.splitlines())
    heap, workers = 1024, sum(m["workers"] for m in MODELS)
    memory_max = heap + 512 + 64 + workers * DEFAULTS["torchserve_worker_memory_mb"]
    assert props == {"OOMPolicy": "continue", "MemoryMax": str(memory_max * 2**20),
                     "MemoryHigh": str(int(memory_max * 0.9) * 2**20), "TasksMax": "1024",
                     "KillMode": "control-group"}
    for unit, limit in (("torchserve", 2.0), ("nginx", 5.0)):
        out = deployed_host.ssh(f"systemd-analyze security {unit} --no-pager | tail -1").stdout
        score = float(re.search(r"exposure level for \S+: ([0-9.]+)", out).group(1))
        print(f"\n{unit}.service exposure {score}")
        assert score <= limit, out


def test_sandboxed_service_starts_workers_predicts_and_reports_the_kept_metrics(deployed_host, host_ca):
    models = json.loads(deployed_host.unix_http("/run/torchserve/management/management.sock", "/models/fmnist")["body"])
    assert [w["status"] for w in models[0]["workers"]] == ["READY", "READY"]
    assert requests.put(f"{deployed_host.https}/predictions/fmnist", data=PHOTO, verify=host_ca,
                        timeout=30).json()["label"] == "T-shirt/top"
    # Only the metrics of /etc/torchserve/metrics.yaml; the host's gauges are the node exporter's.
    body = deployed_host.unix_http("/run/torchserve/metrics/metrics.sock", "/metrics", user="torchserve")["body"]
    for name in ("ts_inference_requests_total", "ts_inference_latency_microseconds", "Requests2XX"):
        assert re.search(rf"^{name}\{{", body, re.M), (name, body[:2000])
    assert not re.search(r"^(CPUUtilization|MemoryUsed|GPUUtilization)\{", body, re.M), body[:2000]
    assert "disable_system_metrics=true" in deployed_host.ssh("cat /etc/torchserve/config.properties").stdout
    assert "Traceback" not in deployed_host.ssh("cat /var/log/torchserve/torchserve.log").stdout


def test_temp_area_is_cleared_on_every_start(deployed_host, host_ca):
    tmp = "/var/lib/torchserve/tmp"
    deployed_host.ssh(f"install -d -o torchserve {tmp}/models/left-by-a-crash && touch {tmp}/models/left-by-a-crash/x")
    # A crash: the JVM dies without cleaning up, systemd starts the unit again.
    restarts = int(deployed_host.ssh("systemctl show -P NRestarts torchserve").stdout)
    deployed_host.ssh("pkill -KILL -u torchserve -x java")
    deadline = time.monotonic() + 60
    while int(deployed_host.ssh("systemctl show -P NRestarts torchserve").stdout) == restarts:
        assert time.monotonic() < deadline, "torchserve was not restarted after the JVM crash"
        time.sleep(1)
    wait_ready(deployed_host, host_ca)
    left = deployed_host.ssh(f"ls {tmp}/models").stdout.split()
    assert "left-by-a-crash" not in left and len(left) == 1, left


def test_socket_folders_and_metrics_socket_permissions(deployed_host):
    group = DEFAULTS["torchserve_inference_socket_group"]
    stats = deployed_host.ssh("stat -c '%n %a %U %G' /run/torchserve/inference /run/torchserve/management"
                              " /run/torchserve/metrics /run/torchserve/*/*.sock").stdout.splitlines()
    assert sorted(stats) == sorted([
        f"/run/torchserve/inference 2750 torchserve {group}",
        "/run/torchserve/management 700 torchserve torchserve",
        "/run/torchserve/metrics 2750 torchserve torchserve-metrics",
        f"/run/torchserve/inference/inference.sock 770 torchserve {group}",
        "/run/torchserve/management/management.sock 770 torchserve torchserve",
        "/run/torchserve/metrics/metrics.sock 770 torchserve torchserve-metrics",
    ])
    refused = deployed_host.unix_http("/run/torchserve/metrics/metrics.sock", "/metrics", user="www-data")
    assert refused["status"] is None and "Permission denied" in refused["error"]
    assert deployed_host.unix_http("/run/torchserve/metrics/metrics.sock", "/metrics", user="torchserve")["status"] == 200


def test_model_registration_only_by_root_and_only_from_the_model_store(deployed_host, tmp_path):
    """The model API is on for upgrades, on the root-only management socket;
    even root loads nothing from outside the model store."""
    sock = "/run/torchserve/management/management.sock"
    deployed_host.ssh("cp /opt/torchserve/model-store/fmnist-1.0.mar /var/lib/torchserve/other.mar")
    try:
        refused = deployed_host.unix_http(sock, "/models?url=fmnist-1.0.mar&model_name=intruder", "POST",
                                          user="www-data")
        assert refused["status"] is None and "Permission denied" in refused["error"], refused
        for url in ("/var/lib/torchserve/other.mar", "../../../var/lib/torchserve/other.mar",
                    "file:///var/lib/torchserve/other.mar", "http://127.0.0.1:9/other.mar"):
            r = deployed_host.unix_http(sock, f"/models?url={url}&model_name=intruder&initial_workers=1", "POST")
            assert r["status"] in (400, 404), (url, r)
        names = [m["modelName"] for m in json.loads(deployed_host.unix_http(sock, "/models")["body"])["models"]]
        assert names == ["fmnist"]
    finally:
        deployed_host.ssh("rm -f /var/lib/torchserve/other.mar")


def test_nginx_sandbox_keeps_config_test_reload_and_log_rotation(deployed_host, host_ca):
    assert deployed_host.ssh("systemctl show -P FragmentPath -P DropInPaths nginx").stdout.split()[-1] == \
        "/etc/systemd/system/nginx.service.d/hardening.conf"
    assert "test is successful" in deployed_host.ssh("nginx -t").stderr
    pid = deployed_host.ssh("systemctl show -P MainPID nginx").stdout.strip()
    deployed_host.ssh("systemctl reload nginx")
    wait_ready(deployed_host, host_ca, timeout=30)
    assert deployed_host.ssh("systemctl show -P MainPID nginx").stdout.strip() == pid
    # What Debian's /etc/logrotate.d/nginx does: move the file, then USR1 through invoke-rc.d.
    deployed_host.ssh("mv /var/log/nginx/access.log /var/log/nginx/access.log.1 && invoke-rc.d nginx rotate")
    wait_ready(deployed_host, host_ca, timeout=30)
    stat = deployed_host.ssh("stat -c '%U %s' /var/log/nginx/access.log").stdout.split()
    assert stat[0] == "www-data" and int(stat[1]) > 0, stat
    assert deployed_host.ssh("systemctl is-active nginx").stdout.strip() == "active"


def test_preflight_refuses_queues_that_do_not_fit_the_heap(deployed_host):
    before = deployed_host.state()
    r = deployed_host.playbook("-e", "torchserve_job_queue_size=100", "-e", '{"torchserve_vmargs": "-Xmx512m"}')
    out = " ".join((r.stdout + r.stderr).split())  # the YAML callback folds long messages
    assert r.returncode != 0
    # 100 x 6553500 B = 625 MiB of bodies against 3/4 of a 512 MiB heap, named by its three variables.
    assert "torchserve_job_queue_size=100 x torchserve_max_request_size=6553500" in out, out[-3000:]
    assert "= 625.0 MiB" in out and "(512 MiB from -Xmx in torchserve_vmargs=" in out, out[-3000:]
    assert recap(r.stdout, deployed_host.name)["changed"] == 0
    assert deployed_host.state() == before
    no_heap = deployed_host.playbook("-e", '{"torchserve_vmargs": "-XX:+ExitOnOutOfMemoryError"}')
    assert no_heap.returncode != 0 and "(0 MiB from -Xmx in torchserve_vmargs=" in " ".join(no_heap.stdout.split()), \
        no_heap.stdout[-3000:]

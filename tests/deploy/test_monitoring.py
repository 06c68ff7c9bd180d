"""Metrics, monitoring and public explanations on sandbox hosts, checked from
outside: the session's server re-deployed with the metrics listener and
/explanations/fmnist turned on, then two more hosts (their own state dir):
an HAProxy balancer in front of that server, with its metrics listener on,
and the real Prometheus of the torchserve_monitoring role scraping both.
Figures (scrape sizes and times, setup times) are printed (`pytest -s`)."""
from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import subprocess
import time
from dataclasses import dataclass

import pytest
import requests

from deploy_helpers import REPO, Host, recap, sandbox_as_host, sandbox_info

pytestmark = pytest.mark.deploy
PHOTO = (REPO / "files/samples/tshirt4.jpg").read_bytes()
PASSWORD = secrets.token_urlsafe(24)
ENABLED = {"torchserve_metrics_enabled": True, "torchserve_metrics_password": PASSWORD,
           "torchserve_nginx_explanations_models": ["fmnist"]}
MON_STATE = REPO / ".sandbox/pytest-monitoring"
MON = ["python3", str(REPO / "sandbox/hosts.py"), "--state-dir", str(MON_STATE), "--prefix", "pytest-mon",
       "--group", "torchserve_monitoring"]
MON_HOST = "pytest-mon1"
LB_HOST = "pytest-mon-lb1"
# The balancer in front of the session's server: plain HTTP, metrics on.
LB_ENABLED = {"torchserve_balancer_metrics_enabled": True, "torchserve_balancer_metrics_password": PASSWORD}


def curl(*args: str) -> tuple[int, str]:
    """curl as a client on this machine; returns (HTTP status, body)."""
    r = subprocess.run(["curl", "-sS", "-k", "-o", "/dev/stdout", "-w", "\n%{http_code}", "--max-time", "60", *args],
                       capture_output=True, text=True, timeout=90)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def metrics_url(host: Host, path: str) -> str:
    return f"https://127.0.0.1:{host.ports['torchserve_metrics_port']}/metrics/{path}"


def test_explanations_are_not_public_by_default(deployed_host, host_ca):
    for method in ("PUT", "POST"):
        r = requests.request(method, f"{deployed_host.https}/explanations/fmnist", data=PHOTO, verify=host_ca, timeout=30)
        assert r.status_code == 404 and r.json()["code"] == 404, (method, r.status_code, r.text)
    assert curl(metrics_url(deployed_host, "torchserve"))[0] == 0, "no metrics listener while turned off"


@pytest.mark.parametrize("extra, expect", [
    ({"torchserve_metrics_password": "short"}, "set torchserve_metrics_password (16 characters or more"),
    ({"torchserve_metrics_allowed_networks": []}, "torchserve_metrics_allowed_networks to the Prometheus servers"),
    ({"torchserve_metrics_node_exporter_port": 9443, "torchserve_metrics_port": 9443}, "four distinct ports"),
    ({"torchserve_nginx_explanations_models": ["../admin"]}, "torchserve_nginx_explanations_models only URL-safe names"),
])
def test_bad_metrics_settings_fail_preflight_before_any_change(deployed_host, extra, expect):
    before = deployed_host.state()
    r = deployed_host.playbook("-e", json.dumps({**ENABLED, **extra}))
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode != 0 and expect in out, out[-3000:]
    assert recap(r.stdout, deployed_host.name)["changed"] == 0
    assert deployed_host.state() == before


@pytest.fixture(scope="module")
def monitored(deployed_host):
    """The session's server with metrics and explanations on; turned off again after."""
    t0 = time.monotonic()
    r = deployed_host.playbook("-e", json.dumps(ENABLED))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    print(f"\nre-deploy with metrics and explanations on: {time.monotonic() - t0:.0f} s")
    again = deployed_host.playbook("-e", json.dumps(ENABLED))
    assert again.returncode == 0 and recap(again.stdout, deployed_host.name)["changed"] == 0, again.stdout[-6000:]
    state = {"on": True}
    yield deployed_host, state
    if state["on"]:
        deployed_host.playbook()


@dataclass
class Monitoring:
    api: str  # Prometheus's HTTP API
    lb: Host  # the balancer
    argv: list  # deploy.yml over the server's and these hosts' inventories

    def deploy(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def lb_url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.lb.ports['torchserve_balancer_metrics_port']}/metrics/{path}"

    @property
    def public(self) -> str:
        return f"http://127.0.0.1:{self.lb.ports['torchserve_balancer_http_port']}"


@pytest.fixture(scope="module")
def prometheus(monitored):
    """Two more sandbox hosts: a Prometheus (group torchserve_monitoring) and a
    balancer in front of the session's server, all three deployed by
    playbooks/deploy.yml over both inventories (adding a balancer and a
    monitoring host to a running server)."""
    host, _ = monitored
    t0 = time.monotonic()
    subprocess.run(MON + ["create", "--count", "1", "--balancers", "1"], check=True, timeout=600)
    try:
        info = sandbox_info(MON, MON_HOST)
        mon = Monitoring(f"http://127.0.0.1:{info['ports']['torchserve_monitoring_port']}", sandbox_as_host(MON, LB_HOST),
                         ["ansible-playbook", "-i", host.inventory, "-i", info["inventory"], "playbooks/deploy.yml",
                          "-e", "torchserve_nginx_tls_enabled=true", "-e", json.dumps({**ENABLED, **LB_ENABLED})])
        r = mon.deploy(timeout=1800)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        print(f"\nbalancer and monitoring host created and deployed: {time.monotonic() - t0:.0f} s")
        # The server's own re-run is checked in `monitored`.
        again = mon.deploy("--limit", f"{MON_HOST}:{LB_HOST}", timeout=1200)
        assert again.returncode == 0, again.stdout[-4000:]
        for name in (MON_HOST, LB_HOST):
            assert recap(again.stdout, name)["changed"] == 0, (name, again.stdout[-4000:])
        yield mon
    finally:
        if not os.environ.get("KEEP_HOSTS"):
            subprocess.run(MON + ["destroy"], timeout=300)


def query(api: str, expr: str) -> list:
    r = requests.get(f"{api}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def value(api: str, expr: str) -> float | None:
    result = query(api, expr)
    return float(result[0]["value"][1]) if result else None


def test_metrics_listener_refuses_strangers_and_is_not_the_public_port(monitored):
    host, _ = monitored
    port = host.ports["torchserve_metrics_port"]
    assert port not in (host.ports["torchserve_nginx_http_port"], host.ports["torchserve_nginx_https_port"])
    for path in ("torchserve", "nginx", "node"):
        assert curl(metrics_url(host, path))[0] == 401, path
        assert curl("-u", "prometheus:wrong-password-0123456", metrics_url(host, path))[0] == 401, path
        # Right password, address not on the allow-list.
        assert curl("--interface", "127.0.0.2", "-u", f"prometheus:{PASSWORD}", metrics_url(host, path))[0] == 403, path
        code, body = curl("-u", f"prometheus:{PASSWORD}", metrics_url(host, path))
        assert code == 200 and "# TYPE" in body, (path, code, body[:300])
    # Plain HTTP on the metrics port, and metrics on the public port: no.
    assert curl(f"http://127.0.0.1:{port}/metrics/torchserve")[0] == 400
    for base in (host.https, host.http):
        assert curl(f"{base}/metrics/torchserve")[0] in (301, 404), base
    listeners = host.ssh("ss -Hltn").stdout
    for exporter in ("torchserve_metrics_node_exporter_port", "torchserve_metrics_nginx_exporter_port",
                     "torchserve_metrics_stub_status_port"):
        assert f"127.0.0.1:{host.ports[exporter]} " in listeners, (exporter, listeners)
        assert f"0.0.0.0:{host.ports[exporter]} " not in listeners and f"*:{host.ports[exporter]} " not in listeners


def test_public_explanation_of_a_photo(monitored):
    host, _ = monitored
    code, body = curl("-T", str(REPO / "files/samples/tshirt4.jpg"), f"{host.https}/explanations/fmnist")
    assert code == 200, body[:500]
    explanation = json.loads(body)
    amap = explanation["attributions"]
    assert len(amap) == 28 and all(len(row) == 28 for row in amap)
    assert any(v != 0.0 for row in amap for v in row), "all-zero attribution map"
    code, body = curl("-T", str(REPO / "files/samples/tshirt4.jpg"), f"{host.https}/predictions/fmnist")
    assert code == 200 and json.loads(body)["label"] == explanation["label"] == "T-shirt/top", (body, explanation["label"])
    # The edge's path and method rules hold here too.
    assert curl("-T", str(REPO / "files/samples/tshirt4.jpg"), f"{host.https}/explanations/%66mnist")[0] == 400
    assert curl("--path-as-is", "-T", str(REPO / "files/samples/tshirt4.jpg"),
                f"{host.https}/explanations/x/../fmnist")[0] == 400
    assert curl(f"{host.https}/explanations/fmnist")[0] == 405
    assert curl("-T", str(REPO / "files/samples/tshirt4.jpg"), f"{host.https}/explanations/not-a-model")[0] == 404


def test_explanations_have_a_tighter_per_client_limit(monitored):
    """12 explanations at once from one (untrusted) address: 1 + burst 2 pass,
    plus one per second the batch took (rate 1/s); the others get 429 at
    once. The general limit (50/s, burst 100) would pass them all.
    Predictions from that address still pass."""
    host, _ = monitored
    photo = str(REPO / "files/samples/tshirt4.jpg")
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda _: curl("--interface", "127.0.0.2", "-T", photo,
                                             f"{host.https}/explanations/fmnist")[0], range(12)))
    took = time.monotonic() - t0
    print(f"\n12 simultaneous explanations from one address in {took:.1f} s: {sorted(codes)}")
    assert set(codes) <= {200, 429} and 1 <= codes.count(200) <= 3 + int(took) + 1, codes
    assert codes.count(429) >= 1, codes
    assert curl("--interface", "127.0.0.2", "-T", photo, f"{host.https}/predictions/fmnist")[0] == 200


def test_balancer_metrics_listener_refuses_strangers_and_is_not_a_public_port(prometheus):
    mon = prometheus
    ports = mon.lb.ports
    assert ports["torchserve_balancer_metrics_port"] not in (ports["torchserve_balancer_http_port"],
                                                              ports["torchserve_balancer_https_port"])
    expected = {"haproxy": "haproxy_backend_active_servers{", "node": "node_filesystem_avail_bytes{"}
    for path, metric in expected.items():
        url = mon.lb_url(path)
        assert curl(url)[0] == 401, path
        assert curl("-u", "prometheus:wrong-password-0123456", url)[0] == 401, path
        # Right password, address not on the allow-list.
        assert curl("--interface", "127.0.0.2", "-u", f"prometheus:{PASSWORD}", url)[0] == 403, path
        code, body = curl("-u", f"prometheus:{PASSWORD}", url)
        assert code == 200 and metric in body, (path, code, body[:300])
    assert curl("-u", f"prometheus:{PASSWORD}", mon.lb_url("torchserve"))[0] == 404
    # Plain HTTP on the metrics port gets nothing; no metrics on the public port.
    assert curl(f"http://127.0.0.1:{ports['torchserve_balancer_metrics_port']}/metrics/haproxy")[0] == 0
    code, body = curl(f"{mon.public}/metrics/haproxy")
    assert code == 404 and "haproxy_" not in body, (code, body[:300])
    listeners = mon.lb.ssh("ss -Hltn").stdout
    node = ports["torchserve_balancer_metrics_node_exporter_port"]
    assert f"127.0.0.1:{node} " in listeners and f"*:{node} " not in listeners, listeners


def test_prometheus_scrapes_the_server_and_balancer_and_counts_requests(monitored, prometheus):
    host, _ = monitored
    api = prometheus.api
    want = {(host.name, "torchserve"): "1", (host.name, "nginx"): "1", (host.name, "node"): "1",
            (LB_HOST, "haproxy"): "1", (LB_HOST, "node"): "1"}
    # Every job of both hosts is up, both public /ping probes succeed, the rules are loaded.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ups = {(r["metric"]["host"], r["metric"]["job"]): r["value"][1] for r in query(api, 'up{host!=""}')}
        probes = {r["metric"]["instance"]: r["value"][1] for r in query(api, 'probe_success{job="torchserve_endpoint"}')}
        if ups == want and list(probes.values()) == ["1", "1"]:
            break
        time.sleep(3)
    assert ups == want and list(probes.values()) == ["1", "1"], (ups, probes)
    assert f"{prometheus.public}/ping" in probes, probes
    groups = requests.get(f"{api}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {g["name"] for g in groups} == {"torchserve_recording", "torchserve_alerts"}
    assert len([r for g in groups for r in g["rules"] if r["type"] == "alerting"]) == 11
    assert value(api, 'max(probe_ssl_earliest_cert_expiry{job="torchserve_endpoint"}) - time()') > 30 * 86400
    assert value(api, 'haproxy_backend_active_servers{job="haproxy", proxy="torchserve"}') == 1
    assert value(api, f'haproxy_server_status{{job="haproxy", proxy="torchserve", server="{host.name}", state="UP"}}') == 1

    # Baseline straight from the listeners, then a burst through the balancer:
    # 40 predictions and 6 bodies that are no image (the handler's 415).
    def counters() -> dict:
        out = {"requests": 0.0, "4xx": 0.0, "lb 4xx": 0.0, "lb 2xx": 0.0}
        for line in curl("-u", f"prometheus:{PASSWORD}", metrics_url(host, "torchserve"))[1].splitlines():
            if line.startswith("ts_inference_requests_total{") and 'model_name="fmnist"' in line:
                out["requests"] += float(line.split()[-1])
            elif line.startswith("Requests4XX{"):
                out["4xx"] += float(line.split()[-1])
        for line in curl("-u", f"prometheus:{PASSWORD}", prometheus.lb_url("haproxy"))[1].splitlines():
            if line.startswith("haproxy_frontend_http_responses_total{") and 'proxy="torchserve_public"' in line:
                for code in ("2xx", "4xx"):
                    if f'code="{code}"' in line:
                        out[f"lb {code}"] += float(line.split()[-1])
        return out

    before = counters()
    good, bad = 40, 6
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: curl("-T", str(REPO / "files/samples/tshirt4.jpg"),
                                             f"{prometheus.public}/predictions/fmnist")[0], range(good)))
        codes += list(pool.map(lambda i: curl("--data-binary", f"not an image {i}", "-H",
                                              "Content-Type: application/octet-stream",
                                              f"{prometheus.public}/predictions/fmnist")[0], range(bad)))
    assert codes == [200] * good + [415] * bad, codes
    expected = {"requests": before["requests"] + good + bad, "4xx": before["4xx"] + bad, "lb 4xx": before["lb 4xx"] + bad}
    t0 = time.monotonic()
    deadline = t0 + 120
    while time.monotonic() < deadline:
        seen = {"requests": value(api, 'sum(ts_inference_requests_total{job="torchserve", model_name="fmnist"})'),
                "4xx": value(api, 'sum(Requests4XX{job="torchserve"})'),
                "lb 4xx": value(api, 'sum(haproxy_frontend_http_responses_total{job="haproxy", proxy="torchserve_public", code="4xx"})')}
        lb_2xx = value(api, 'sum(haproxy_frontend_http_responses_total{job="haproxy", proxy="torchserve_public", code="2xx"})')
        if seen == expected and lb_2xx >= before["lb 2xx"] + good:
            break
        time.sleep(2)
    print(f"\nPrometheus saw the burst through the balancer ({good} predictions, {bad} bad) "
          f"{time.monotonic() - t0:.1f} s after it: {seen}, balancer 2xx +{lb_2xx - before['lb 2xx']:.0f}")
    assert seen == expected, (seen, expected, before)
    # The balancer's 2xx also count Prometheus's own /ping probes through it.
    assert before["lb 2xx"] + good <= lb_2xx <= before["lb 2xx"] + good + 20, (lb_2xx, before)
    for job in ("torchserve", "nginx", "node", "haproxy"):
        for r in query(api, f'scrape_samples_scraped{{job="{job}"}}'):
            duration = value(api, f'scrape_duration_seconds{{job="{job}", host="{r["metric"]["host"]}"}}')
            print(f"scrape {job}@{r['metric']['host']}: {float(r['value'][1]):.0f} samples in {duration * 1000:.1f} ms")
    assert value(api, 'nginx_connections_accepted{job="nginx"}') > good + bad
    assert value(api, f'node_filesystem_size_bytes{{job="node", host="{LB_HOST}", mountpoint="/"}}') > 0


@pytest.mark.parametrize("extra, expect", [
    ({"torchserve_balancer_metrics_password": "short"}, "set torchserve_balancer_metrics_password (16 characters or more"),
    ({"torchserve_balancer_metrics_allowed_networks": []}, "torchserve_balancer_metrics_allowed_networks to the"),
    ({"torchserve_balancer_metrics_allowed_networks": ["10.0.0.0/8; deny all"]}, "IP addresses only in it"),
    ({"torchserve_balancer_metrics_port": 80, "torchserve_balancer_http_port": 80}, "two listeners cannot share one port"),
])
def test_bad_balancer_metrics_settings_fail_preflight_before_any_change(prometheus, extra, expect):
    mon = prometheus
    config = "md5sum /etc/haproxy/haproxy.cfg"
    before = mon.lb.ssh(config).stdout
    r = mon.deploy("--limit", LB_HOST, "-e", json.dumps(extra))
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode != 0 and expect in out, out[-3000:]
    assert recap(r.stdout, LB_HOST)["changed"] == 0
    assert mon.lb.ssh(config).stdout == before


def test_turning_balancer_metrics_off_closes_its_listener_and_stops_the_exporter(prometheus):
    mon = prometheus
    r = mon.deploy("--limit", LB_HOST, "-e", "torchserve_balancer_metrics_enabled=false")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert curl("-u", f"prometheus:{PASSWORD}", mon.lb_url("haproxy"))[0] == 0
    unit = "prometheus-node-exporter"
    state = mon.lb.ssh(f"systemctl is-active {unit}; systemctl is-enabled {unit}", check=False).stdout.split()
    assert state == ["inactive", "disabled"], state
    # The public side is untouched.
    assert curl("-T", str(REPO / "files/samples/tshirt4.jpg"), f"{mon.public}/predictions/fmnist")[0] == 200


def test_turning_metrics_off_closes_the_listener_and_explanations(monitored, host_ca):
    host, state = monitored
    r = host.playbook()
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    state["on"] = False
    assert curl(metrics_url(host, "torchserve"))[0] == 0
    assert "torchserve-metrics" not in host.ssh("id -nG www-data").stdout.split()
    assert host.ssh("systemctl is-active prometheus-node-exporter prometheus-nginx-exporter", check=False).stdout.split() \
        == ["inactive", "inactive"]
    refused = host.unix_http("/run/torchserve/metrics/metrics.sock", "/metrics", user="www-data")
    assert refused["status"] is None and "Permission denied" in refused["error"]
    r = requests.put(f"{host.https}/explanations/fmnist", data=PHOTO, verify=host_ca, timeout=30)
    assert r.status_code == 404, r.text

"""The serving benchmark's "no nginx" setup on the deployed host: the same TorchServe
(deployed config.properties and .mar) on a loopback TCP port, the deployed service
stopped meanwhile and back afterwards."""
import json
import shutil
import sys
import time

import pytest
import requests

from deploy_helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import serving  # noqa: E402  (benchmarks/serving.py)

pytestmark = pytest.mark.deploy
PHOTO = (REPO / "files/samples/tshirt4.jpg").read_bytes()
RAW = {"Content-Type": "application/octet-stream"}


def same_answer(a: dict, b: dict) -> bool:
    """Same label and classes; probabilities equal up to float noise between worker processes."""
    return (a["label"], list(a["probabilities"])) == (b["label"], list(b["probabilities"])) and all(
        abs(a["probabilities"][k] - b["probabilities"][k]) < 1e-5 for k in a["probabilities"])


def test_direct_instance_answers_like_nginx_and_the_service_comes_back(deployed_host, host_ca, tmp_path):
    if shutil.which("wrk") is None:
        pytest.fail("wrk not found: apt-get install wrk (make deps installs it)", pytrace=False)
    public = f"{deployed_host.https}/predictions/fmnist"
    via_nginx = requests.put(public, data=PHOTO, headers=RAW, verify=host_ca, timeout=30)
    assert via_nginx.status_code == 200, via_nginx.text
    host = serving.Host(deployed_host.ssh_argv, deployed_host.ports)

    with serving.direct_instance(host) as url:
        assert url.startswith("http://127.0.0.1:")
        direct = requests.put(url, data=PHOTO, headers=RAW, timeout=30)
        assert direct.status_code == 200 and same_answer(direct.json(), via_nginx.json()), direct.text
        # One TorchServe on the CPUs at a time: the deployed one is stopped meanwhile.
        assert deployed_host.ssh("systemctl is-active torchserve", check=False).stdout.strip() != "active"
        bad = tmp_path / "bad.bin"
        bad.write_bytes(b"\x00" * 512)
        assert serving.wrk(url, 4, 1, [bad])["non2xx"] > 0  # the handler's own 4xx comes through
        load = serving.wrk(url, 4, 1, [REPO / "files/samples/tshirt4.jpg"])
        assert load["requests"] > 0 and load["errors"] == 0, load

    assert deployed_host.ssh(f"systemctl is-active {serving.DIRECT_UNIT}", check=False).stdout.strip() != "active"
    deadline = time.monotonic() + 180
    while True:  # the deployed service is started again and serves through nginx
        try:
            r = requests.put(public, data=PHOTO, headers=RAW, verify=host_ca, timeout=5)
            if r.status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the deployed service did not come back after the direct run"
        time.sleep(0.5)
    assert same_answer(r.json(), via_nginx.json()), r.text


DESCRIBE = """
import http.client, json, socket
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect("%s/run/management.sock")
c = C("localhost")
c.request("GET", "/models/fmnist")
print(c.getresponse().read().decode())
""" % serving.HOST_BENCH_DIR


def test_sweep_settings_reach_the_direct_instance(deployed_host, tmp_path):
    """What the sweep varies (archive's model-config, models=, netty threads) is what TorchServe runs with."""
    host = serving.Host(deployed_host.ssh_argv, deployed_host.ports)
    model = {"workers": 1, "batch_size": 4, "max_batch_delay": 3}
    config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 3, "responseTimeout": 30,
              "handler": {"topk": 3, "intra_op_threads": 2}}
    mar = serving.build_mar(tmp_path, "fmnist", config).read_bytes()
    with serving.direct_instance(host, mar=mar, model=model, netty_threads=1) as url:
        r = requests.put(url, data=PHOTO, headers=RAW, timeout=30)
        assert r.status_code == 200 and r.json()["label"] == "T-shirt/top"
        desc = json.loads(deployed_host.ssh(f"python3 -c '{DESCRIBE}'").stdout)[0]
        props = deployed_host.ssh(f"cat {serving.HOST_BENCH_DIR}/config.properties").stdout.splitlines()
        logs = deployed_host.ssh(f"ls {serving.HOST_BENCH_DIR}/logs").stdout.split()
        model_log = deployed_host.ssh(f"cat {serving.HOST_BENCH_DIR}/logs/torchserve.log").stdout
    assert (desc["batchSize"], desc["maxBatchDelay"], len(desc["workers"])) == (4, 3, 1), desc
    assert "number_of_netty_threads=1" in props
    assert "threads=2" in model_log  # the handler's startup line: the archive's intra_op_threads
    # The deployed log settings (one file set, no line per request), not TorchServe's defaults.
    assert "torchserve.log" in logs and "access_log.log" not in logs, logs

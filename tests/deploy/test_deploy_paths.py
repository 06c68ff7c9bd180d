"""Deploy paths the default test host does not take: pip's `index` mode (the
default for real servers) against a PEP 503 index on loopback, your own TLS
certificate and key, plain HTTP served when the redirect is off, a run limited
to one tag, and ssh refusing a host whose key is not the known one."""
import hashlib
import json
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from deploy_helpers import REPO, recap

pytestmark = pytest.mark.deploy
SAMPLE = (REPO / "files/samples/tshirt4.jpg").read_bytes()


def predict_until_ok(url: str, verify, limit: float = 180) -> requests.Response:
    """First 200 of a prediction within `limit` seconds (TorchServe restarting)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            r = requests.put(url, data=SAMPLE, verify=verify, timeout=30, allow_redirects=False)
            if r.status_code == 200 or time.monotonic() > deadline:
                return r
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


def simple_index(wheels: Path, root: Path) -> None:
    """A PEP 503 simple index of the controller's wheel cache under root/simple."""
    projects: dict[str, list[str]] = {}
    (root / "files").mkdir(parents=True)
    for wheel in sorted(wheels.glob("*.whl")):
        (root / "files" / wheel.name).symlink_to(wheel)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        projects.setdefault(name, []).append(f'<a href="/files/{wheel.name}#sha256={digest}">{wheel.name}</a>')
    for name, links in projects.items():
        (root / "simple" / name).mkdir(parents=True)
        (root / "simple" / name / "index.html").write_text("<!DOCTYPE html>\n" + "<br>\n".join(links) + "\n")
    (root / "simple/index.html").write_text(
        "<!DOCTYPE html>\n" + "\n".join(f'<a href="/simple/{n}/">{n}</a>' for n in sorted(projects)) + "\n")


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_index_mode_own_certificate_and_no_redirect_on_a_fresh_host(fresh_host, tmp_path):
    # The index: the wheels the controller already holds, served on loopback only.
    wheels = next(p.parent for p in (REPO / ".cache/wheelhouse").glob("cp3*/torch-*.whl"))
    simple_index(wheels, tmp_path / "index")
    port = free_loopback_port()
    access_log = tmp_path / "index-access.log"
    with open(access_log, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", str(tmp_path / "index")], stdout=log, stderr=subprocess.STDOUT)
    # Our own certificate and key (not the role's self-signed one).
    cert, key = tmp_path / "own.crt", tmp_path / "own.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=own-cert.test",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps({
        "torchserve_pip_mode": "index", "torchserve_pip_index_url": f"http://127.0.0.1:{port}/simple/",
        "torchserve_pip_extra_index_url": "", "torchserve_nginx_tls_certificate": str(cert),
        "torchserve_nginx_tls_certificate_key": str(key), "torchserve_nginx_tls_redirect_http": False}))
    try:
        r = fresh_host.playbook("-e", f"@{extra}")
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        again = fresh_host.playbook("-e", f"@{extra}")
        assert again.returncode == 0 and recap(again.stdout, fresh_host.name)["changed"] == 0, again.stdout[-3000:]
    finally:
        server.terminate()  # the one process this test started, by its handle
        server.wait(timeout=30)
    # pip on the host fetched the packages from that index; no wheelhouse was copied.
    fetched = access_log.read_text()
    for wheel in ("torch-2.13.0", "torchserve-0.12.0", "torch_model_archiver-0.12.0"):
        assert re.search(rf'"GET /files/{re.escape(wheel)}[^ ]*\.whl HTTP/1\.1" 200', fetched), wheel
    assert fresh_host.ssh("test -e /var/cache/torchserve/wheelhouse", check=False).returncode == 1
    # HTTPS presents exactly our certificate, and a client trusting it is served.
    served = ssl.get_server_certificate(("127.0.0.1", fresh_host.ports["torchserve_nginx_https_port"]))
    assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(cert.read_text())
    ok = requests.put(f"{fresh_host.https}/predictions/fmnist", data=SAMPLE, verify=str(cert), timeout=30)
    assert ok.status_code == 200 and ok.json()["label"] == "T-shirt/top", ok.text
    # Redirect off: plain HTTP serves the inference routes itself.
    plain = requests.put(f"{fresh_host.http}/predictions/fmnist", data=SAMPLE, timeout=30, allow_redirects=False)
    assert plain.status_code == 200 and plain.json()["label"] == "T-shirt/top", (plain.status_code, plain.text)


def test_one_tag_alone(deployed_host, host_ca):
    """`--tags torchserve_configure` runs just that phase: a config change is
    written, TorchServe restarted by the handler, and the host serves again."""
    pid = deployed_host.ssh("systemctl show -P MainPID torchserve").stdout.strip()
    try:
        r = deployed_host.playbook("--tags", "torchserve_configure", "-e", "torchserve_default_response_timeout=121")
        assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
        assert recap(r.stdout, deployed_host.name)["changed"] >= 1
        # Only torchserve's tasks ran. Tagged `always`, in every role: argument
        # validation and loading the distribution's data (package names).
        always = ("Validating arguments against arg spec", "Distribution data", "Find the distribution's data",
                  "Assert a supported distribution and release", "Load the distribution's data")
        ran = {m[0] for m in re.findall(r"^TASK \[(\w+) : (.*?)\] \*", r.stdout, re.M)
               if not m[1].startswith(always)}
        assert ran == {"torchserve"}, ran
        assert "TASK [torchserve : Write config.properties]" in r.stdout
        assert "RUNNING HANDLER [torchserve : Restart torchserve]" in r.stdout
        assert "default_response_timeout=121" in deployed_host.ssh("cat /etc/torchserve/config.properties").stdout
        assert deployed_host.ssh("systemctl show -P MainPID torchserve").stdout.strip() != pid
        ok = predict_until_ok(f"{deployed_host.https}/predictions/fmnist", host_ca)
        assert ok.status_code == 200 and ok.json()["label"] == "T-shirt/top", ok.text
    except BaseException:
        # Restore and wait until it serves again, so later tests start from a
        # working host; the failure above is the report.
        deployed_host.playbook("--tags", "torchserve_configure")
        predict_until_ok(f"{deployed_host.https}/predictions/fmnist", host_ca)
        raise
    restored = deployed_host.playbook("--tags", "torchserve_configure")
    assert restored.returncode == 0, restored.stdout[-4000:]
    assert "default_response_timeout=121" not in deployed_host.ssh("cat /etc/torchserve/config.properties").stdout
    assert predict_until_ok(f"{deployed_host.https}/predictions/fmnist", host_ca).status_code == 200


def test_ssh_refuses_a_host_whose_key_is_not_the_known_one(deployed_host, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().split()
    port = deployed_host.ports["ssh"]
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{port} {other[0]} {other[1]}\n")
    argv = [f"UserKnownHostsFile={tmp_path / 'known_hosts'}" if a.startswith("UserKnownHostsFile=") else a
            for a in deployed_host.ssh_argv]
    assert "StrictHostKeyChecking=yes" in argv
    r = subprocess.run(argv + ["true"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 255 and "Host key verification failed" in r.stderr, r.stderr
    assert deployed_host.ssh("true").returncode == 0  # with the host's own key it connects

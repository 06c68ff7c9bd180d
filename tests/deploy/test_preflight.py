"""A bad variable or a taken port fails preflight with a message naming the
problem, before anything on the host changes; a config nginx rejects leaves
the running nginx, its files, its enabled site and its workers as they were
(no reload), with nginx's own error in the failure."""
import pytest
import requests

from deploy_helpers import REPO, recap

pytestmark = pytest.mark.deploy


def refused(host, *extra, expect: str):
    before = host.state()
    r = host.playbook(*extra)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    # Ansible's YAML output wraps long messages: compare with whitespace folded.
    assert " ".join(expect.split()) in " ".join(out.split()), out[-4000:]
    assert recap(r.stdout, host.name)["changed"] == 0
    assert host.state() == before
    return out


def test_equal_public_ports(deployed_host):
    port = deployed_host.ports["torchserve_nginx_https_port"]
    refused(deployed_host, "-e", f"torchserve_nginx_http_port={port}", expect="two listeners cannot share one port")


def test_equal_grpc_ports(deployed_host):
    refused(deployed_host, "-e", "torchserve_grpc_inference_port=7100", "-e", "torchserve_grpc_management_port=7100",
            expect="must be two different ports in 1-65535")


def test_out_of_range_port(deployed_host):
    refused(deployed_host, "-e", "torchserve_nginx_https_port=70000", expect="ports must be in 1-65535")


def test_unknown_pip_mode(deployed_host):
    refused(deployed_host, "-e", "torchserve_pip_mode=ftp",
            expect="value of torchserve_pip_mode must be one of: index, wheelhouse, got: ftp")


def test_port_held_by_another_process(deployed_host):
    # A free port of this host's own block, taken by a program that is not nginx,
    # on the loopback address nginx is told to listen on (the hosts share the
    # machine's network: 0.0.0.0 would serve on every interface of the machine).
    port = deployed_host.ports["torchserve_nginx_http_port"] + 1
    pid = deployed_host.ssh(
        f"setsid python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 < /dev/null & echo $!").stdout.strip()
    try:
        deployed_host.ssh(f"for i in $(seq 50); do ss -Hltn 'sport = :{port}' | grep -q . && exit 0; sleep 0.1; done; exit 1")
        out = refused(deployed_host, "-e", f"torchserve_nginx_http_port={port}",
                      expect=f"port {port} is already held by python3 (pid {pid}, 127.0.0.1)")
        assert "Stop it or choose another torchserve_nginx_http_port" in out
    finally:
        deployed_host.ssh(f"kill {pid}", check=False)


def test_rejected_nginx_config_keeps_old_one(deployed_host, host_ca):
    before = deployed_host.state()
    r = deployed_host.playbook("-e", "torchserve_nginx_server_name='bad name {'")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "nginx -t rejected the new site, the previous config is back in place" in out, out[-4000:]
    # nginx's own words: what it rejected, and where.
    assert "[emerg]" in out and "/etc/nginx/sites-enabled/torchserve.conf:" in out, out[-4000:]
    assert "configuration file /etc/nginx/nginx.conf test failed" in " ".join(out.split()), out[-4000:]
    assert deployed_host.state() == before
    ok = requests.put(f"{deployed_host.https}/predictions/fmnist",
                      data=(REPO / "files/samples/tshirt3.jpeg").read_bytes(), verify=host_ca, timeout=30)
    assert ok.status_code == 200 and ok.json()["label"] == "T-shirt/top"


def test_tls_certificate_without_key(deployed_host):
    cert = str(REPO / "files/samples/tshirt4.jpg")  # any controller file: the pair is incomplete
    refused(deployed_host, "-e", f"torchserve_nginx_tls_certificate={cert}",
            expect="give both torchserve_nginx_tls_certificate and torchserve_nginx_tls_certificate_key as files on the controller, or neither")


def test_tls_certificate_file_missing(deployed_host, tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("not used\n")
    missing = tmp_path / "no-such-cert.pem"
    out = refused(deployed_host, "-e", f"torchserve_nginx_tls_certificate={missing}", "-e", f"torchserve_nginx_tls_certificate_key={key}",
                  expect="give both torchserve_nginx_tls_certificate and torchserve_nginx_tls_certificate_key")
    assert str(missing) in "".join(out.split())


def test_java_older_than_required(deployed_host):
    # Debian 12's JRE is 17: a role asked for more refuses after reading `java -version`.
    out = refused(deployed_host, "-e", "torchserve_java_min_major_version=99", expect="need Java >= 99")
    assert 'openjdk version "17.' in " ".join(out.split())

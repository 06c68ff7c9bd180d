"""Deploy paths of the edge that need their own playbook runs on the deployed
TLS host: a failing `nginx -t` never takes down the live site (both
branches), the self-signed certificate is renewed near its end, a list of
listen addresses with IPv6. Each test leaves the host as deployed."""
from __future__ import annotations

import datetime
import http.client
import json
import ssl

import pytest

from deploy_helpers import REPO
from edge_helpers import tls_context

pytestmark = pytest.mark.deploy
PHOTO = (REPO / "files/samples/tshirt4.jpg").read_bytes()
SITE = "/etc/nginx/sites-available/torchserve.conf"
LINK = "/etc/nginx/sites-enabled/torchserve.conf"
CERT = "/etc/nginx/tls/torchserve.crt"


def predict(port: int, address: str = "127.0.0.1") -> tuple[int, dict]:
    conn = http.client.HTTPSConnection(address, port, context=tls_context(), timeout=30)
    try:
        conn.request("PUT", "/predictions/fmnist", body=PHOTO)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def assert_served(host, address: str = "127.0.0.1") -> None:
    status, doc = predict(host.ports["torchserve_nginx_https_port"], address)
    assert status == 200 and doc["label"] == "T-shirt/top", (status, doc)


def site_files(host) -> dict:
    """The site, its link, and any backup a run left behind."""
    return {"site": host.ssh(f"sha256sum {SITE}").stdout.split()[0],
            "link": host.ssh(f"readlink {LINK}", check=False).stdout.strip(),
            "backups": host.ssh("ls /etc/nginx/sites-available").stdout.split()}


def test_foreign_broken_config_never_disables_the_live_site(deployed_host):
    h = deployed_host
    before = site_files(h)
    assert before["link"] == SITE and before["backups"] == ["default", "torchserve.conf"], before
    h.ssh("echo 'this is not nginx {' > /etc/nginx/conf.d/zz-broken.conf")
    try:
        r = h.playbook()
        out = r.stdout + r.stderr
        assert r.returncode != 0
        assert "nginx -t failed on a config that is not this site; the site is unchanged and stays enabled" in out, \
            out[-4000:]
        assert "/etc/nginx/conf.d/zz-broken.conf" in out  # nginx's own words
        assert site_files(h) == before
        assert_served(h)
    finally:
        h.ssh("rm -f /etc/nginx/conf.d/zz-broken.conf")
    # Measured before the fix: the link was gone, so this reload took the site down.
    h.ssh("systemctl reload nginx")
    assert_served(h)


def test_rejected_new_site_puts_the_old_one_back_and_leaves_no_backup(deployed_host):
    h = deployed_host
    before = site_files(h)
    r = h.playbook("-e", "torchserve_nginx_server_name='bad name {'")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "nginx -t rejected the new site, the previous config is back in place" in out, out[-4000:]
    assert "/etc/nginx/sites-enabled/torchserve.conf" in out and "test failed" in out  # nginx's own words
    assert site_files(h) == before
    h.ssh("systemctl reload nginx")
    assert_served(h)


def not_after(host) -> datetime.datetime:
    end = host.ssh(f"openssl x509 -enddate -noout -in {CERT}").stdout.strip().split("=", 1)[1]
    return datetime.datetime.strptime(end, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=datetime.timezone.utc)


def served_certificate(host) -> str:
    pem = ssl.get_server_certificate(("127.0.0.1", host.ports["torchserve_nginx_https_port"]))
    return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(pem))


def test_self_signed_certificate_renewed_near_its_end(deployed_host):
    h = deployed_host
    original = h.ssh(f"cat {CERT}").stdout
    # What the certificate looks like 10 days before its end.
    h.ssh(f"openssl req -x509 -key /etc/nginx/tls/torchserve.key -subj /CN=about-to-expire -days 10 -out {CERT}"
          " && systemctl reload nginx")
    try:
        assert (not_after(h) - datetime.datetime.now(datetime.timezone.utc)).days < 11
        r = h.playbook()
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert (not_after(h) - datetime.datetime.now(datetime.timezone.utc)).days > 800
        file_pem = h.ssh(f"cat {CERT}").stdout
        assert served_certificate(h) == ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(file_pem))
        assert "about-to-expire" not in h.ssh(f"openssl x509 -subject -noout -in {CERT}").stdout
        assert_served(h)
    finally:
        # The session's other tests verify TLS against the certificate they fetched first.
        h.ssh(f"cat > {CERT} <<'EOF'\n{original}EOF\nsystemctl reload nginx")


def test_ipv4_and_ipv6_listen_addresses(deployed_host):
    h = deployed_host
    try:
        r = h.playbook("-e", '{"torchserve_nginx_listen_addresses": ["127.0.0.1", "::1"]}')
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        listeners = h.ssh(f"ss -Hltn 'sport = :{h.ports['torchserve_nginx_https_port']}'").stdout
        assert "[::1]:" in listeners and "127.0.0.1:" in listeners, listeners
        assert_served(h, "::1")
        assert_served(h, "127.0.0.1")
    finally:
        r = h.playbook()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert_served(h)

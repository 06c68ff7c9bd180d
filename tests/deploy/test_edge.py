"""The public edge tried as an attacker would, from outside, on the deployed
TLS host: path tricks, floods, slow clients, absurd bodies, nginx's own
answers, TLS settings, the redirect, the inference socket's group. Every
bad-input class ends with a good request served normally."""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from deploy_helpers import REPO
from edge_helpers import (many_field_form, many_part_multipart, request, service_memory, slow_header_client,
                          timed, tls_context)

pytestmark = pytest.mark.deploy
PHOTO = (REPO / "files/samples/tshirt4.jpg").read_bytes()


def https_port(host) -> int:
    return host.ports["torchserve_nginx_https_port"]


def assert_good(host, source: str = "127.0.0.1") -> None:
    status, _, body = request(https_port(host), "PUT", "/predictions/fmnist", PHOTO, source=source)
    assert status == 200 and json.loads(body)["label"] == "T-shirt/top", (status, body[:300])


def nginx_json(status: int, headers: dict, body: bytes, code: int) -> dict:
    """An answer nginx made itself: the code, a JSON body, no TorchServe request id."""
    assert status == code, (status, body[:300])
    assert headers["content-type"] == "application/json", headers
    assert "x-request-id" not in headers, "TorchServe saw this request"
    doc = json.loads(body)
    assert doc["code"] == code and doc["message"], doc
    return doc


# --- paths -----------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/predictions/zz/..%2Ffmnist",                              # measured: reached TorchServe as model zz
    "/explanations/fmnist/..%2F..%2Fpredictions%2Ffmnist",      # measured: reached the explanations route
    "/predictions/fmnist%2F..%2F..%2Fmodels",
    "/predictions/fmnist%2f1.0",
    "/predictions/%2e%2e/models",
    "/predictions/fmnist/%2e%2e/%2e%2e/models",
    "/predictions/fmnist/%252e%252e%252fmodels",                # double encoding
    "/predictions/fmnist%252F..%252Fother",
    "/%70redictions/fmnist",
    "/predictions/zz/../fmnist",
    "/predictions/fmnist/./1.0",
    "/predictions/fmnist/..",
])
def test_encoded_paths_are_answered_by_nginx(deployed_host, path):
    status, headers, body = request(https_port(deployed_host), "PUT", path, PHOTO)
    doc = nginx_json(status, headers, body, 400)
    assert "%-escapes or dot segments" in doc["message"]
    assert_good(deployed_host)


def test_torchserve_gets_the_matched_path(deployed_host):
    """Merged slashes, a trailing slash and a query reach TorchServe as the
    clean /predictions/fmnist: the model answers."""
    for path in ["//predictions//fmnist", "/predictions/fmnist/", "/predictions/fmnist?model=other&x=1"]:
        status, headers, body = request(https_port(deployed_host), "PUT", path, PHOTO)
        assert status == 200 and json.loads(body)["label"] == "T-shirt/top", (path, status, body[:300])
        assert "x-request-id" in headers


# --- nginx's own answers -----------------------------------------------------

@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/predictions/fmnist", "POST, PUT"),
    ("DELETE", "/predictions/fmnist", "POST, PUT"),
    ("PATCH", "/predictions/fmnist/1.0", "POST, PUT"),
    ("POST", "/ping", "GET, HEAD"),
    ("DELETE", "/ping", "GET, HEAD"),
])
def test_wrong_method_gets_json_405(deployed_host, method, path, allow):
    status, headers, body = request(https_port(deployed_host), method, path)
    nginx_json(status, headers, body, 405)
    assert headers["allow"] == allow
    assert_good(deployed_host)


def test_not_found_and_too_large_are_json(deployed_host):
    port = https_port(deployed_host)
    nginx_json(*request(port, "GET", "/nothing/here"), 404)
    nginx_json(*request(port, "POST", "/predictions/not-a-model", PHOTO), 404)
    nginx_json(*request(port, "PUT", "/predictions/fmnist", b"\0" * 7_000_000), 413)
    assert_good(deployed_host)


def test_torchserve_down_gives_json_502_with_retry_after(deployed_host):
    deployed_host.ssh("systemctl stop torchserve")
    try:
        status, headers, body = request(https_port(deployed_host), "PUT", "/predictions/fmnist", PHOTO)
        nginx_json(status, headers, body, 502)
        assert int(headers["retry-after"]) > 0
    finally:
        deployed_host.ssh("systemctl start torchserve")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                status, _, body = request(https_port(deployed_host), "PUT", "/predictions/fmnist", PHOTO)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(2)
    assert_good(deployed_host)


# --- floods and slow clients -------------------------------------------------

def flood(port: int, source: str, threads: int = 16, per_thread: int = 40) -> list[tuple[int, dict, bytes]]:
    """GET /ping as fast as keepalive connections from one address allow."""
    def one_client(_):
        conn = http.client.HTTPSConnection("127.0.0.1", port, source_address=(source, 0),
                                           context=tls_context(), timeout=30)
        out = []
        try:
            for _ in range(per_thread):
                conn.request("GET", "/ping")
                r = conn.getresponse()
                out.append((r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()))
        finally:
            conn.close()
        return out
    with ThreadPoolExecutor(threads) as pool:
        return [a for answers in pool.map(one_client, range(threads)) for a in answers]


def test_flood_from_one_address_gets_429_while_others_are_served(deployed_host):
    port = https_port(deployed_host)
    meanwhile = []
    done = threading.Event()

    def trusted_client():
        while not done.is_set():
            meanwhile.append(request(port, "PUT", "/predictions/fmnist", PHOTO, source="127.0.0.1")[0])

    t = threading.Thread(target=trusted_client)
    t.start()
    try:
        answers = flood(port, "127.0.0.2")
    finally:
        done.set()
        t.join()
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {200, 429}, statuses
    limited = [a for a in answers if a[0] == 429]
    assert limited, f"no 429 in {len(answers)} requests"
    for status, headers, body in limited[:5]:
        nginx_json(status, headers, body, 429)
        assert int(headers["retry-after"]) >= 1
    assert meanwhile and set(meanwhile) == {200}, meanwhile
    time.sleep(3)  # the bucket drains at the configured rate
    assert_good(deployed_host, source="127.0.0.2")


def test_trusted_address_is_never_limited(deployed_host):
    statuses = [a[0] for a in flood(https_port(deployed_host), "127.0.0.1")]
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


def test_connections_per_address_are_limited(deployed_host):
    """32 requests in progress (headers sent, body pending) from one address:
    the 33rd gets 429; another address is served meanwhile."""
    port = https_port(deployed_host)
    held = []
    try:
        for _ in range(32):
            s = tls_context().wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10,
                                                                   source_address=("127.0.0.5", 0)))
            s.sendall(b"PUT /predictions/fmnist HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            held.append(s)
        time.sleep(0.5)
        status, headers, body = request(port, "PUT", "/predictions/fmnist", PHOTO, source="127.0.0.5")
        nginx_json(status, headers, body, 429)
        assert_good(deployed_host, source="127.0.0.6")
    finally:
        for s in held:
            s.close()
    time.sleep(1)
    assert_good(deployed_host, source="127.0.0.5")


def test_slow_header_client_is_cut_off_within_15_s(deployed_host):
    seconds = slow_header_client(https_port(deployed_host), pause=5, limit=40)
    assert seconds < 15, f"a client sending a header line every 5 s kept its connection {seconds:.1f} s"
    assert_good(deployed_host)


# --- absurd bodies -------------------------------------------------------------

def multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, dict]:
    b = "XyZ0boundary"
    body = b"".join(f'--{b}\r\nContent-Disposition: form-data; name="{n}"; filename="{n}"\r\n\r\n'.encode()
                    + v + b"\r\n" for n, v in parts) + f"--{b}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={b}"}


@pytest.mark.parametrize("photo", ["tshirt3.jpeg", "tshirt4.jpg"])
def test_ordinary_forms_still_pass(deployed_host, photo):
    port = https_port(deployed_host)
    image = (REPO / "files/samples" / photo).read_bytes()
    body, headers = multipart([("data", image)] + [(f"extra{i}", b"x") for i in range(7)])
    status, _, answer = request(port, "POST", "/predictions/fmnist", body, headers)
    assert status == 200 and json.loads(answer)["label"] == "T-shirt/top", answer[:300]
    # curl --data-binary @photo labels the binary form-urlencoded; its '&' bytes are no fields.
    assert image.count(b"&") > 8
    status, _, answer = request(port, "POST", "/predictions/fmnist", image,
                                {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and json.loads(answer)["label"] == "T-shirt/top", answer[:300]


@pytest.mark.parametrize("make", [many_part_multipart, many_field_form,
                                  lambda: multipart([(f"f{i}", b"x") for i in range(9)]),
                                  lambda: (b"&".join(b"a=%d" % i for i in range(9)),
                                           {"Content-Type": "application/x-www-form-urlencoded"})],
                         ids=["multipart-at-cap", "form-at-cap", "multipart-9-parts", "form-9-fields"])
def test_absurd_body_refused_at_the_edge(deployed_host, make):
    body, headers = make()
    status, answer_headers, answer = request(https_port(deployed_host), "POST", "/predictions/fmnist", body, headers)
    assert status == 400, (status, answer[:300])
    assert "x-request-id" not in answer_headers, "TorchServe saw this body"
    assert json.loads(answer)["error"] == "too_many_parts"
    assert_good(deployed_host)


@pytest.mark.parametrize("make", [many_part_multipart, many_field_form], ids=["multipart", "form"])
def test_absurd_bodies_in_parallel_cost_the_service_nothing(deployed_host, make):
    """8 bodies at the size cap at once: each refused within seconds, the JVM
    and the workers do not grow, another client is answered meanwhile."""
    port = https_port(deployed_host)
    body, headers = make()
    before = service_memory(deployed_host)
    with ThreadPoolExecutor(9) as pool:
        bad = [pool.submit(timed, request, port, "POST", "/predictions/fmnist", body, headers, source="127.0.0.3")
               for _ in range(8)]
        time.sleep(0.2)
        good_seconds, (good_status, _, _) = pool.submit(
            timed, request, port, "PUT", "/predictions/fmnist", PHOTO, source="127.0.0.4").result()
        answers = [f.result() for f in bad]
    after = service_memory(deployed_host)
    assert [a[1][0] for a in answers] == [400] * 8
    assert max(a[0] for a in answers) < 10, [round(a[0], 2) for a in answers]
    assert good_status == 200 and good_seconds < 10, (good_status, good_seconds)
    # Before the edge check: JVM 199 -> 876 MB, each worker +300 MB, 19 s stalls.
    assert after["java"]["rss"] - before["java"]["rss"] < 50, (before, after)
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]], "a worker died"
    for b, a in zip(before["workers"], after["workers"]):
        assert a["rss"] - b["rss"] < 50, (before, after)
    assert_good(deployed_host, source="127.0.0.3")


# --- TLS -----------------------------------------------------------------------

def handshake(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw)


def old_client(version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = tls_context()
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # let this client offer what old clients offer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are the point here
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_refused(deployed_host, version):
    # The server's alert, not a client that could not offer the version.
    with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
        handshake(https_port(deployed_host), old_client(version)).close()


def test_cbc_suites_refused_gcm_and_tls13_accepted(deployed_host):
    port = https_port(deployed_host)
    cbc = old_client(ssl.TLSVersion.TLSv1_2)
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:"
                    "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA:AES128-SHA:AES256-SHA:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match="ALERT_HANDSHAKE_FAILURE"):
        handshake(port, cbc).close()
    gcm = old_client(ssl.TLSVersion.TLSv1_2)
    gcm.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    with handshake(port, gcm) as s:
        assert s.version() == "TLSv1.2"
        assert not s.session.has_ticket, "TLS session tickets are on"
    with handshake(port, old_client(ssl.TLSVersion.TLSv1_3)) as s:
        assert s.version() == "TLSv1.3"


def test_hsts_on_every_https_answer(deployed_host):
    port = https_port(deployed_host)
    for method, path in [("GET", "/ping"), ("GET", "/nothing"), ("GET", "/predictions/fmnist")]:
        _, headers, _ = request(port, method, path)
        assert headers.get("strict-transport-security") == "max-age=63072000", (path, headers)


def test_redirect_ignores_a_forged_host(deployed_host):
    fqdn = deployed_host.ssh("python3 -c 'import socket; print(socket.getfqdn())'").stdout.strip()
    status, headers, _ = request(deployed_host.ports["torchserve_nginx_http_port"], "GET", "/ping?x=1",
                                 headers={"Host": "evil.example"}, tls=False)
    assert status == 301
    assert headers["location"] == f"https://{fqdn}:{https_port(deployed_host)}/ping?x=1"


# --- who may reach TorchServe ----------------------------------------------------

def test_only_nginx_may_use_the_inference_socket(deployed_host):
    h = deployed_host
    folder = "/run/torchserve/inference"
    assert h.ssh(f"stat -c '%a %U %G' {folder}").stdout.split() == ["2750", "torchserve", "torchserve-inference"]
    assert "torchserve-inference" in h.ssh("id -nG www-data").stdout.split()
    connect = f"python3 -c \"import socket; socket.socket(socket.AF_UNIX).connect('{folder}/inference.sock')\""
    h.ssh(f"runuser -u www-data -- {connect}")
    # Other web software sharing nginx's group www-data, but not its user, is kept out.
    h.ssh("id edgeprobe >/dev/null 2>&1 || useradd --system --no-create-home -g www-data edgeprobe")
    try:
        r = h.ssh(f"runuser -u edgeprobe -- {connect}", check=False)
        assert r.returncode != 0 and "Permission denied" in r.stderr, r
    finally:
        h.ssh("userdel edgeprobe", check=False)

"""TLS mode: the public endpoint answers over HTTPS with the host's own
(self-signed) certificate; plain HTTP redirects; only inference is public."""
import base64
import json

import pytest
import requests

from deploy_helpers import REPO

pytestmark = pytest.mark.deploy
SAMPLES = REPO / "files/samples"


@pytest.mark.parametrize("photo", ["tshirt3.jpeg", "tshirt4.jpg"])
def test_https_prediction_verified_against_host_certificate(deployed_host, host_ca, photo):
    r = requests.put(f"{deployed_host.https}/predictions/fmnist", data=(SAMPLES / photo).read_bytes(),
                     verify=host_ca, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["label"] == "T-shirt/top"


def test_curl_data_binary_default_form_type_still_works(deployed_host, host_ca):
    # curl --data-binary @img.jpg sends application/x-www-form-urlencoded; TorchServe alone
    # would form-decode the JPEG and fail with 500. nginx hands it over as raw bytes.
    jpg = (SAMPLES / "tshirt4.jpg").read_bytes()
    assert b"%" in jpg  # the byte that makes TorchServe's form decoder fail
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = requests.post(f"{deployed_host.https}/predictions/fmnist", data=jpg, headers=form, verify=host_ca, timeout=30)
    assert r.status_code == 200 and r.json()["label"] == "T-shirt/top", r.text[:300]
    b64 = base64.b64encode(jpg).decode()
    r = requests.post(f"{deployed_host.https}/predictions/fmnist", data={"data": b64}, verify=host_ca, timeout=30)
    assert r.status_code == 200 and r.json()["label"] == "T-shirt/top", r.text[:300]


def test_http_redirects_to_https(deployed_host):
    # To the configured name (the host's FQDN by default), whatever Host the client sent.
    fqdn = deployed_host.ssh("python3 -c 'import socket; print(socket.getfqdn())'").stdout.strip()
    r = requests.get(f"{deployed_host.http}/ping", allow_redirects=False, timeout=10)
    assert r.status_code == 301
    assert r.headers["Location"] == f"https://{fqdn}:{deployed_host.ports['torchserve_nginx_https_port']}/ping"


def test_ping_healthy_over_https(deployed_host, host_ca):
    r = requests.get(f"{deployed_host.https}/ping", verify=host_ca, timeout=10)
    assert r.status_code == 200 and json.loads(r.text)["status"] == "Healthy"


SURFACE = ["/models", "/models/fmnist", "/models/fmnist/1.0", "/metrics", "/api-description",
           "/explanations/fmnist", "/v1/models/fmnist:predict", "/v2/models/fmnist/infer", "/predictions/other", "/"]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("path", SURFACE)
def test_management_and_metrics_not_public(deployed_host, host_ca, path, method):
    r = requests.request(method, f"{deployed_host.https}{path}", verify=host_ca, timeout=10)
    assert r.status_code == 404, (method, path, r.status_code, r.text)
    assert r.headers["Content-Type"] == "application/json"
    assert r.json()["code"] == 404 and "/predictions/<model>" in r.json()["message"]


def test_bad_upload_gets_415_json_and_service_keeps_serving(deployed_host, host_ca):
    bad = requests.put(f"{deployed_host.https}/predictions/fmnist", data=b"this is not an image",
                       verify=host_ca, timeout=30)
    assert bad.status_code == 415, bad.text
    assert bad.json()["reason"] == "not_an_image" and bad.json()["code"] == 415, bad.text
    good = requests.put(f"{deployed_host.https}/predictions/fmnist",
                        data=(SAMPLES / "tshirt4.jpg").read_bytes(), verify=host_ca, timeout=30)
    assert good.status_code == 200 and good.json()["label"] == "T-shirt/top"


def test_oversized_body_refused_by_nginx(deployed_host, host_ca):
    r = requests.put(f"{deployed_host.https}/predictions/fmnist", data=b"\0" * 7_000_000,
                     verify=host_ca, timeout=30)
    assert r.status_code == 413
    assert r.headers["Content-Type"] == "application/json" and r.json()["code"] == 413

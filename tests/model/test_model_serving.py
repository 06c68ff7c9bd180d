"""A real TorchServe 0.12 serving the .mar built from model_src/ and files/ (see fmnist_support.server)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import re
import threading
import time
from pathlib import Path

import pytest
import requests
from fmnist_support import BATCH_SIZE, MAX_BATCH_DELAY, SAMPLES, png_bytes
from PIL import Image

pytestmark = pytest.mark.serving

TSHIRT = "T-shirt/top"
BATCH_LINE = re.compile(r"fmnist batch size=(\d+) ok=(\d+) errors=(\d+)")
JPG = (SAMPLES / "tshirt3.jpeg").read_bytes()


def post(server, **kw) -> requests.Response:
    return requests.post(server.predict_url, timeout=30, **kw)


def assert_tshirt(resp: requests.Response, what: str) -> None:
    assert resp.status_code == 200, (what, resp.status_code, resp.text[:500])
    assert resp.headers.get("content-type", "").startswith("application/json"), (what, resp.headers)
    body = resp.json()
    assert body["label"] == TSHIRT and body["index"] == 0, (what, body)
    assert list(body["probabilities"])[0] == TSHIRT and len(body["probabilities"]) == 3, (what, body)


def assert_error(resp: requests.Response, code: int, reason: str, what: str) -> dict:
    assert resp.status_code == code, (what, resp.status_code, resp.text[:500])
    body = resp.json()
    assert body["code"] == code and body["reason"] == reason and body["error"], (what, body)
    return body


def batches_logged(server) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m.groups())) for m in BATCH_LINE.finditer(server.model_log())]


def wait_for_batches(server, predicate, since=0, timeout=15.0):
    """Batch lines after the first `since` ones that satisfy predicate. model_log.log is written by
    the frontend from the workers' stdout: poll it briefly."""
    deadline = time.monotonic() + timeout
    while True:
        found = [b for b in batches_logged(server)[since:] if predicate(b)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def listening_on_loopback(port: int) -> bool:
    """True if /proc/net/tcp{,6} has a LISTEN socket on 127.0.0.1:port (or ::ffff:127.0.0.1)."""
    for table, loopback in (("/proc/net/tcp", "0100007F"), ("/proc/net/tcp6", "0000000000000000FFFF00000100007F")):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":
                return addr == loopback
    return False


# --------------------------------------------------------------------------- server basics
def test_server_is_ready_on_loopback(server):
    assert requests.get(f"{server.url}/ping", timeout=5).json()["status"] == "Healthy"
    model = requests.get(f"{server.management_url}/models/fmnist", timeout=5).json()[0]
    assert model["batchSize"] == BATCH_SIZE and model["maxBatchDelay"] == MAX_BATCH_DELAY
    assert [w["status"] for w in model["workers"]] == ["READY", "READY"]
    for port in (server.inference_port, server.management_port, server.metrics_port, server.grpc_inf, server.grpc_mgmt):
        assert listening_on_loopback(port), f"port {port} is not listening on 127.0.0.1 only"


# --------------------------------------------------------------------------- what real clients send
def test_request_styles(server):
    b64 = base64.b64encode(JPG).decode()
    padded = base64.b64encode(JPG + b"\0").decode()  # ends with '=': survives form decoding
    assert padded.endswith("=") and "+" in padded
    styles = {
        "curl -T img.jpg (PUT, no content type)": dict(method="PUT", data=JPG),
        "POST application/octet-stream": dict(data=JPG, headers={"Content-Type": "application/octet-stream"}),
        "POST image/jpeg": dict(data=JPG, headers={"Content-Type": "image/jpeg"}),
        "curl -F data=@img.jpg (multipart)": dict(files={"data": ("img.jpg", JPG, "image/jpeg")}),
        "multipart, other field name": dict(files={"file": ("img.jpg", JPG, "image/jpeg")}),
        'JSON {"data": base64}': dict(json={"data": b64}),
        "bare base64, text/plain": dict(data=b64, headers={"Content-Type": "text/plain"}),
        "bare base64, octet-stream": dict(data=b64, headers={"Content-Type": "application/octet-stream"}),
        "curl --data-binary @img.b64 (form-urlencoded)": dict(
            data=padded, headers={"Content-Type": "application/x-www-form-urlencoded"}
        ),
        "curl -d data=<base64> (form-urlencoded, '+' unescaped)": dict(
            data="data=" + b64, headers={"Content-Type": "application/x-www-form-urlencoded"}
        ),
        "requests data={'data': base64} (form-urlencoded, escaped)": dict(data={"data": b64}),
    }
    for what, kw in styles.items():
        method = kw.pop("method", "POST")
        assert_tshirt(requests.request(method, server.predict_url, timeout=30, **kw), what)


def test_seed_photos_are_tshirts(server):
    for name in ("tshirt3.jpeg", "tshirt4.jpg"):
        assert_tshirt(post(server, data=(SAMPLES / name).read_bytes()), name)
        assert_tshirt(post(server, files={"data": (name, (SAMPLES / name).read_bytes(), "image/jpeg")}), name)


def test_form_urlencoded_binary(server, test_set):
    """curl --data-binary @img.png without -H: TorchServe form-decodes (and corrupts) the body."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    images, _ = test_set
    # A binary body without '%': the frontend splits it at '&'/'=' and UTF-8-mangles it; the
    # handler sees the pieces and answers 415 with a hint.
    png = next(b for b in (png_bytes(images[i]) for i in range(200)) if b"%" not in b)
    body = assert_error(post(server, data=png, headers=form), 415, "form_urlencoded", "binary PNG as form")
    assert "application/octet-stream" in body["error"]
    # Unpadded base64 has no '=': Netty 4.1.53 drops such a body entirely; still a clear 415.
    unpadded = base64.b64encode(JPG[: len(JPG) // 3 * 3])
    assert not unpadded.endswith(b"=")
    assert_error(post(server, data=unpadded, headers=form), 415, "form_urlencoded", "unpadded base64 as form")
    # A body with '%' not followed by two hex digits (most JPEGs and larger PNGs) is rejected by
    # the *frontend* (HTTP 500, ErrorDataDecoderException) before the handler runs: nothing a
    # handler can do about it. The workers are unaffected.
    assert b"%" in JPG
    resp = post(server, data=JPG, headers=form)
    assert resp.status_code == 500 and "ErrorDataDecoderException" in resp.text, resp.text[:300]
    assert_tshirt(post(server, data=JPG), "good request after form-encoded ones")


# --------------------------------------------------------------------------- bad input
def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_bad_inputs(server):
    jpg4 = (SAMPLES / "tshirt4.jpg").read_bytes()
    cases = [
        ("empty body", b"", 400, "empty_body"),
        ("not an image", b"hello, this is not an image", 415, "not_an_image"),
        ("random binary", bytes(range(256)) * 8, 415, "not_an_image"),
        ("truncated JPEG", jpg4[: len(jpg4) // 2], 400, "corrupt_image"),
        ("decompression bomb 8000x8000", _encode(Image.new("1", (8000, 8000)), "PNG"), 413, "image_too_large"),
        ("1x1 image", _encode(Image.new("L", (1, 1), 255), "PNG"), 422, "image_too_small"),
        ("bad JSON shape", b'{"image_url": "http://example.invalid/x.jpg"}', 400, "bad_json"),
        ("bad base64 in JSON", b'{"data": "!!!not base64!!!"}', 400, "bad_base64"),
        ("bad base64 as a form field", b"data=not base64 at all!", 400, "bad_base64"),
        ("empty base64", b'{"data": ""}', 400, "empty_body"),
        ("TIFF (not in the list)", _encode(Image.new("RGB", (64, 64)), "TIFF"), 415, "not_an_image"),
        ("WebP over its pixel limit", _encode(Image.new("RGB", (2100, 2100)), "WEBP"), 413, "image_too_large"),
    ]
    for what, data, code, reason in cases:
        headers = {"Content-Type": "application/json"} if data.startswith(b"{") else {}
        assert_error(post(server, data=data, headers=headers), code, reason, what)
        assert_tshirt(post(server, data=JPG), f"good request after {what}")
    # Multipart with more parts than an upload has: refused before any part is looked at.
    parts = {"data": ("img.jpg", JPG, "image/jpeg"), **{f"f{i}": (None, "1") for i in range(8)}}
    assert_error(post(server, files=parts), 400, "too_many_fields", "9 multipart parts")
    assert_tshirt(post(server, data=JPG), "good request after 9 multipart parts")
    # "bad_input" (an unexpected error inside the handler) has no input that reaches it from
    # outside; tests/model/test_model_handler.py::test_unexpected_error_is_one_log_line covers it.


# --------------------------------------------------------------------------- batching
def test_burst_is_batched(server, test_set, direct_predictions):
    images, _ = test_set
    idx = list(range(64))
    bodies = [png_bytes(images[i]) for i in idx]
    before = len(batches_logged(server))
    with cf.ThreadPoolExecutor(16) as pool:
        resps = list(pool.map(lambda b: post(server, data=b), bodies))
    assert [r.status_code for r in resps] == [200] * 64
    assert [r.json()["index"] for r in resps] == [int(direct_predictions[i]) for i in idx]
    big = wait_for_batches(server, lambda b: b[0] > 1, since=before)
    assert big, f"no batch larger than 1 for this burst in model_log.log: {batches_logged(server)[before:][-20:]}"
    assert max(b[0] for b in big) <= BATCH_SIZE


def test_bad_item_does_not_fail_its_batch(server, test_set, direct_predictions):
    """Good and bad requests fired together: bad ones get their 4xx, good ones their answer,
    and the model log shows batches that held both."""
    images, _ = test_set
    good = {i: png_bytes(images[i]) for i in range(100, 112)}
    bad = [b"", b"junk" * 10, _encode(Image.new("L", (1, 1)), "PNG"), (SAMPLES / "tshirt4.jpg").read_bytes()[:3000]]
    expected_bad = [(400, "empty_body"), (415, "not_an_image"), (422, "image_too_small"), (400, "corrupt_image")]
    mixed = lambda b: b[1] >= 1 and b[2] >= 1  # noqa: E731
    before = len(batches_logged(server))
    for _ in range(20):  # bounded: batch formation depends on timing
        jobs = [("good", i, body) for i, body in good.items()] + [("bad", k, body) for k, body in enumerate(bad)]
        barrier = threading.Barrier(len(jobs))

        def fire(job):
            barrier.wait(timeout=30)
            return job, post(server, data=job[2])

        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(fire, jobs))
        for (kind, key, _), resp in results:
            if kind == "good":
                assert resp.status_code == 200, resp.text
                assert resp.json()["index"] == int(direct_predictions[key])
            else:
                assert_error(resp, *expected_bad[key], what=f"bad #{key}")
        if wait_for_batches(server, mixed, since=before, timeout=2):
            break
    found = [b for b in batches_logged(server)[before:] if mixed(b)]
    assert found, f"no batch mixed good and bad requests: {batches_logged(server)[before:][-20:]}"


# --------------------------------------------------------------------------- agreement with the model
def test_agreement_with_direct_predictions(server, test_set, direct_predictions):
    """>= 1,000 real test images sent as PNG: served label == the model's own prediction."""
    images, _ = test_set
    idx = list(range(0, 10_000, 10))  # 1,000 images spread over the test set
    assert len(idx) >= 1000

    session = threading.local()

    def ask(i):
        if not hasattr(session, "s"):
            session.s = requests.Session()
        r = session.s.post(server.predict_url, data=png_bytes(images[i]), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["index"]

    with cf.ThreadPoolExecutor(8) as pool:
        served = list(pool.map(ask, idx))
    agree = sum(int(s == int(direct_predictions[i])) for s, i in zip(served, idx)) / len(idx)
    print(f"agreement {agree:.4f} on {len(idx)} test images")
    assert agree >= 0.995, agree

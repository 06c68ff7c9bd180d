"""Explanations (captum Integrated Gradients) from a real TorchServe 0.12: POST
/explanations/fmnist on its loopback port, as a client would. Figures (explanations/s against
predictions/s, worker memory for one explanation) are printed (`pytest -s`)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest
import requests
from fmnist_support import SAMPLES, png_bytes
from test_model_hostile import peak_growth_mb, reset_peaks, worker_pids
from test_model_serving import BATCH_LINE, assert_error

pytestmark = pytest.mark.serving

JPG = (SAMPLES / "tshirt3.jpeg").read_bytes()


def explain_url(server) -> str:
    return f"{server.url}/explanations/fmnist"


def assert_explanation(resp: requests.Response, what: str) -> dict:
    assert resp.status_code == 200, (what, resp.status_code, resp.text[:500])
    assert resp.headers.get("content-type", "").startswith("application/json"), (what, resp.headers)
    body = resp.json()
    amap = body["attributions"]
    assert len(amap) == 28 and all(len(row) == 28 for row in amap), (what, len(amap))
    assert all(isinstance(v, float) for row in amap for v in row), what
    assert any(v != 0.0 for row in amap for v in row), (what, "all-zero attribution map")
    assert body["method"] == "integrated_gradients", body.keys()
    return body


def test_explanation_of_the_sample_photos(server):
    for name in ("tshirt3.jpeg", "tshirt4.jpg"):
        data = (SAMPLES / name).read_bytes()
        body = assert_explanation(requests.post(explain_url(server), data=data, timeout=60), name)
        pred = requests.post(server.predict_url, data=data, timeout=30).json()
        assert (body["label"], body["index"]) == (pred["label"], pred["index"]) == ("T-shirt/top", 0), (body["label"], pred)
        assert body["probabilities"] == pred["probabilities"]
        # The map is about the garment (centre), not the background (corners): per pixel, the
        # centre carries far more attribution (a uniform or noise map would not).
        amap = body["attributions"]
        centre = sum(abs(v) for row in amap[7:21] for v in row[7:21]) / 14**2
        corners = sum(abs(amap[r][c]) for r in (0, 1, 26, 27) for c in (0, 1, 26, 27)) / 16
        assert centre > 5 * corners, (name, centre, corners)


def test_explanations_follow_the_prediction_on_test_images(server, test_set, direct_predictions):
    images, _ = test_set
    for i in range(0, 200, 20):  # 10 test images of different classes
        body = assert_explanation(requests.post(explain_url(server), data=png_bytes(images[i]), timeout=60), f"test image {i}")
        assert body["index"] == int(direct_predictions[i]), (i, body["index"])


def test_request_styles_and_bad_bodies_as_for_predictions(server):
    import base64

    b64 = base64.b64encode(JPG).decode()
    for what, kw in {
        "curl -T (PUT)": dict(method="PUT", data=JPG),
        "multipart": dict(files={"data": ("img.jpg", JPG, "image/jpeg")}),
        "JSON base64": dict(json={"data": b64}),
    }.items():
        method = kw.pop("method", "POST")
        assert_explanation(requests.request(method, explain_url(server), timeout=60, **kw), what)
    from PIL import Image
    import io

    tiny = io.BytesIO()
    Image.new("L", (1, 1)).save(tiny, format="PNG")
    for what, data, headers, code, reason in [
        ("empty body", b"", {}, 400, "empty_body"),
        ("not an image", b"hello, this is not an image", {}, 415, "not_an_image"),
        ("bad JSON", b"[1, 2, 3]", {"Content-Type": "application/json"}, 400, "bad_json"),
        ("1x1 image", tiny.getvalue(), {}, 422, "image_too_small"),
        ("truncated JPEG", JPG[: len(JPG) // 2], {}, 400, "corrupt_image"),
    ]:
        explained = requests.post(explain_url(server), data=data, headers=headers, timeout=30)
        predicted = requests.post(server.predict_url, data=data, headers=headers, timeout=30)
        assert_error(explained, code, reason, what)
        assert explained.json() == predicted.json(), what
    assert_explanation(requests.post(explain_url(server), data=JPG, timeout=60), "good request after bad ones")


def test_the_route_decides_not_a_client_header(server):
    """The frontend marks the request by its route; a client's own `explain` header changes
    nothing (so /predictions never costs an explanation, whatever a client sends)."""
    resp = requests.post(server.predict_url, data=JPG, headers={"explain": "True"}, timeout=60)
    assert resp.status_code == 200 and "attributions" not in resp.json(), resp.text[:300]
    assert_explanation(requests.post(explain_url(server), data=JPG, headers={"explain": "False"}, timeout=60), "explain: False")


def _rate(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, float]:
    """(requests/s, p50 ms) of sending every body once with `concurrency` clients."""
    local = threading.local()
    latencies = []

    def ask(body):
        if not hasattr(local, "s"):
            local.s = requests.Session()
        t0 = time.perf_counter()
        r = local.s.post(url, data=body, timeout=120)
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text[:300]

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(ask, bodies))
    elapsed = time.perf_counter() - start
    return len(bodies) / elapsed, sorted(latencies)[len(latencies) // 2] * 1000


def test_explanation_cost(server, test_set):
    """Explanations/s and predictions/s at c=1 and c=8 in the same run, and the worker memory one
    explanation costs (VmHWM growth over VmRSS just before it)."""
    images, _ = test_set
    bodies = [png_bytes(images[i]) for i in range(48)]
    figures = {}
    for c in (1, 8):
        figures[("prediction", c)] = _rate(server.predict_url, bodies, c)
        figures[("explanation", c)] = _rate(explain_url(server), bodies, c)
    print()
    for (kind, c), (rate, p50) in figures.items():
        print(f"{kind:11s} c={c}: {rate:7.1f}/s  p50 {p50:6.1f} ms")
    for c in (1, 8):
        print(f"explanation/prediction throughput at c={c}: {figures[('explanation', c)][0] / figures[('prediction', c)][0]:.3f}")
    # Bounded and generous (a loaded 2-core box): an explanation is not a stall.
    assert figures[("explanation", 1)][1] < 10_000

    pids = worker_pids(server)
    growth = []
    for _ in range(3):
        before = reset_peaks(pids)
        assert_explanation(requests.post(explain_url(server), data=JPG, timeout=60), "memory probe")
        growth.append(peak_growth_mb(before))
    print(f"worker peak growth for one explanation (3 tries): {', '.join(f'{g:.1f}' for g in growth)} MB")
    assert min(growth) < 64, growth  # the image memory budget; IG on 28x28 needs far less
    lines = [m.group(0) for m in BATCH_LINE.finditer(server.model_log())]
    assert lines, "no batch lines in the model log"

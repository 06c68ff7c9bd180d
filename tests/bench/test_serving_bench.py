"""The serving benchmark (benchmarks/serving.py) itself: payloads, peers, error counting, output.

Short runs on loopback with the real peers (TorchServe with the article's
configuration, FastAPI + uvicorn, the in-process loop) and the real wrk; the
setups on a sandbox host (nginx, direct) are the same code paths with another
URL. No figure is asserted: only that the harness measures what it says.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import serving  # noqa: E402  (benchmarks/serving.py)


def _need_wrk():
    if shutil.which("wrk") is None:
        pytest.fail("wrk not found: apt-get install wrk (make deps installs it)", pytrace=False)


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    return serving.make_payloads(tmp_path_factory.mktemp("payloads"))


def test_payloads_are_test_set_pngs_and_phone_style_jpegs(payloads):
    assert len(payloads["png"]) == 64
    for f in payloads["png"]:
        img = Image.open(f)
        assert (img.format, img.size, img.mode) == ("PNG", (28, 28), "L")
    assert len(payloads["photo"]) == 12
    for f in payloads["photo"]:
        img = Image.open(f)
        assert img.format == "JPEG" and img.mode == "RGB"
        assert 300 <= min(img.size) and max(img.size) <= 1000, img.size
        assert 10_000 <= f.stat().st_size <= 99_999, f.stat().st_size
    # Every photo is still the T-shirt of the sample to the deployed handler.
    labels = serving.expected_labels({"photo": payloads["photo"]})
    assert set(labels.values()) == {"T-shirt/top"}


@pytest.mark.serving
def test_wrk_counts_every_failed_request(payloads, tmp_path):
    """A payload the server refuses (415) shows up as errors, never as throughput alone."""
    _need_wrk()
    bad = tmp_path / "not-an-image.bin"
    bad.write_bytes(b"\x00" * 2048)
    with serving.fastapi_server(serving.FreePorts()) as (url, _):
        good = serving.wrk(url, 2, 1, payloads["png"])
        refused = serving.wrk(url, 2, 1, [bad])
    assert good["requests"] > 0 and good["errors"] == 0
    assert refused["requests"] > 0 and refused["errors"] == refused["non2xx"] == refused["requests"]


@pytest.mark.serving
def test_harness_run_writes_table_plots_and_json(tmp_path):
    """The local setups side by side, end to end through the command line, into --out."""
    _need_wrk()
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/serving.py"), "--setups", "article,fastapi,inproc",
                        "--concurrency", "1,8", "--duration", "2", "--warmup", "1", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((out / "serving.json").read_text())
    got = {(row["payload"], row["setup"], row["c"]) for row in data["rows"]}
    for payload in ("png", "photo"):
        for setup in ("article", "fastapi"):
            assert {(payload, setup, 1), (payload, setup, 8)} <= got
        assert {(payload, "inproc 1p", None), (payload, f"inproc {serving.CORES}p", None)} <= got
    for row in data["rows"]:
        assert row["requests"] > 0 and row["errors"] == 0, row
        assert 0 < row["p50"] <= row["p95"] <= row["p99"], row
        if row["c"] is not None:  # CPU time per request of the server's processes and of wrk
            assert row["cpu_ms"]["workers"] > 0 and row["cpu_ms"]["wrk"] > 0, row["cpu_ms"]
    # The FastAPI peer answers exactly what the deployed handler answers in-process.
    assert data["agree"]["fastapi"] == {"png": 1.0, "photo": 1.0}
    table = (out / "serving.md").read_text()
    assert "| png | FastAPI+uvicorn" in table and "| photo | in-process, 1 process | - |" in table
    assert table in r.stdout
    for name in ("serving-throughput.png", "serving-latency.png"):
        img = Image.open(out / name)
        assert img.format == "PNG" and img.size[0] > 600

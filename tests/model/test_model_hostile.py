"""Hostile bodies against a real TorchServe 0.12 serving the handler (issue: safe on the open
internet): non-image JSON, images at and over their memory limits, many-part multipart.

Memory is measured as an operator would: VmRSS / VmHWM in /proc/PID/status of the worker
processes (their PIDs from the management API) and of the JVM. VmHWM is reset before each
measured request (`5` into /proc/PID/clear_refs), so a peak belongs to that request.
Figures are printed (`pytest -s`)."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import pytest
import requests
from fmnist_support import SAMPLES, BadInput, FashionMNISTHandler
from PIL import Image, ImageDraw

pytestmark = pytest.mark.serving

JPG = (SAMPLES / "tshirt3.jpeg").read_bytes()
TSHIRT = "T-shirt/top"
MB = 2**20


def post(server, **kw) -> requests.Response:
    return requests.post(server.predict_url, timeout=60, **kw)


def assert_good(server, what: str) -> None:
    resp = post(server, data=JPG)
    assert resp.status_code == 200 and resp.json()["label"] == TSHIRT, (what, resp.status_code, resp.text[:300])


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def worker_pids(server) -> list[int]:
    model = requests.get(f"{server.management_url}/models/fmnist", timeout=10).json()[0]
    pids = [int(w["pid"]) for w in model["workers"] if w.get("status") == "READY"]
    assert len(pids) == 2, model["workers"]
    return pids


def jvm_pid(server) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            pgid = int(stat.rsplit(")", 1)[1].split()[2])
            if pgid == server.proc.pid and b"java" in cmd.split(b"\0")[0]:
                return int(entry.name)
    raise AssertionError("no java process in the server's process group")


def reset_peaks(pids) -> dict[int, int]:
    """Reset VmHWM to the current RSS; return the RSS (kB) of each process."""
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return {pid: status_kb(pid, "VmRSS") for pid in pids}


def peak_growth_mb(rss_before: dict[int, int]) -> float:
    return max(status_kb(pid, "VmHWM") - kb for pid, kb in rss_before.items()) / 1024


# --------------------------------------------------------------------------- non-image JSON
NON_IMAGE_JSON = {
    "bare number 3000000000": b"3000000000",
    "bare number 1e308": b"1e308",
    "null": b"null",
    "true": b"true",
    "false": b"false",
    "list": b"[1, 2, 3]",
    "empty object": b"{}",
    "object without an image field": b'{"url": "http://example.invalid/x.jpg"}',
    "image field a number": b'{"data": 3000000000}',
    "image field null": b'{"data": null}',
    "image field a list": b'{"data": [3000000000]}',
    "image field an object": b'{"data": {"data": 1}}',
    "deep nesting, 3 MB": b"[" * 3_000_000 + b"]" * 3_000_000,
    "a million numbers": b"[" + b"0," * 1_000_000 + b"0]",
    "many keys, 6 MB": b"{" + b",".join(b'"%d":1' % i for i in range(600_000)) + b"}",
}


def test_non_image_json_is_refused_fast_and_costs_no_memory(server):
    json_type = {"Content-Type": "application/json"}
    times = {}
    log_start = len(server.model_log().splitlines())
    for what, body in NON_IMAGE_JSON.items():
        t0 = time.perf_counter()
        resp = post(server, data=body, headers=json_type)
        times[what] = time.perf_counter() - t0
        assert resp.status_code == 400, (what, resp.status_code, resp.text[:300])
        assert resp.json() == {"error": BadInput("bad_json").message, "code": 400, "reason": "bad_json"}
        assert times[what] < 1.0, (what, times[what])
        assert_good(server, f"good request after {what}")
    print("\nnon-image JSON, seconds per answer:", {k: round(v, 3) for k, v in times.items()})
    print(f"bare number 3000000000: 400 bad_json in {times['bare number 3000000000'] * 1000:.1f} ms")
    # Each bad request is one line of the handler's (in its batch's line), never a traceback.
    _handler_ms(server, log_start, "bad_json")  # wait until the frontend has written the lines
    new_lines = server.model_log().splitlines()[log_start:]
    assert not [line for line in new_lines if "Traceback" in line or "Failed json decoding" in line], new_lines[-20:]
    assert sum("bad: #0 400 bad_json" in line for line in new_lines) >= len(NON_IMAGE_JSON), new_lines[-20:]

    pids = worker_pids(server)
    before = {pid: status_kb(pid, "VmRSS") for pid in pids}
    bodies = list(NON_IMAGE_JSON.values())
    session = requests.Session()
    for i in range(200):
        resp = session.post(server.predict_url, data=bodies[i % len(bodies)], headers=json_type, timeout=60)
        assert resp.status_code == 400, (i, resp.text[:200])
    after = {pid: status_kb(pid, "VmRSS") for pid in pids}
    growth = {pid: (after[pid] - before[pid]) / 1024 for pid in pids}
    print(f"worker RSS before {before} kB, after 200 non-image JSON bodies {after} kB")
    assert all(g < 50 for g in growth.values()), growth
    assert_good(server, "good request after 200 non-image JSON bodies")


# --------------------------------------------------------------------------- memory per image
def _photo_like(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), (250, 250, 250))
    ImageDraw.Draw(img).rectangle((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(30, 30, 30))
    return img


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


#: The costliest image of each kind the handler accepts: at its format's pixel limit.
AT_LIMIT = {
    "WebP": lambda im: _encode(im, "WEBP", quality=80),
    "PNG RGBA": lambda im: _encode(im.convert("RGBA"), "PNG"),
    "PNG RGB": lambda im: _encode(im, "PNG"),
    "PNG palette + transparency": lambda im: _encode(im.convert("P"), "PNG", transparency=0),
    "progressive JPEG 4:4:4": lambda im: _encode(im, "JPEG", quality=90, progressive=True, subsampling=0),
    "progressive JPEG CMYK": lambda im: _encode(im.convert("CMYK"), "JPEG", progressive=True),
    "baseline JPEG 4:2:0": lambda im: _encode(im, "JPEG", quality=90),
    "GIF": lambda im: _encode(im.convert("P"), "GIF"),
}


def _at_limit(handler: FashionMNISTHandler, make) -> tuple[bytes, int]:
    limit = handler.preprocessor.pixel_limit(Image.open(io.BytesIO(make(_photo_like(64, 48)))))
    height = int((limit * 3 / 4) ** 0.5)
    width = limit // height
    return make(_photo_like(width, height)), width * height


def test_worst_case_images_stay_within_the_memory_budget(server):
    """Every kind of image at its pixel limit is served (200), and no request makes a worker's
    peak RSS grow by more than the 64 MB budget plus the request body it holds (and 8 MB slack);
    one pixel more is refused with 413 before decoding, at no cost."""
    sizer = FashionMNISTHandler()  # defaults, as served (model-config sets no limits)
    pids = worker_pids(server)
    figures = {}
    for what, make in AT_LIMIT.items():
        data, pixels = _at_limit(sizer, make)
        rss = reset_peaks(pids)
        t0 = time.perf_counter()
        resp = post(server, data=data, headers={"Content-Type": "application/octet-stream"})
        seconds = time.perf_counter() - t0
        peak = peak_growth_mb(rss)
        figures[what] = f"{pixels / 1e6:.1f} MP, body {len(data) / MB:.2f} MB: +{peak:.1f} MB peak, {seconds:.2f} s"
        assert resp.status_code == 200, (what, resp.status_code, resp.text[:300])
        assert peak <= 64 + len(data) / MB + 8, (what, figures[what])
    # Over the limit: refused from the header.
    data = _encode(_photo_like(2100, 2100), "WEBP", quality=80)
    rss = reset_peaks(pids)
    resp = post(server, data=data)
    assert resp.status_code == 413 and resp.json()["reason"] == "image_too_large"
    figures["WebP 4.4 MP (over its limit)"] = f"413, +{peak_growth_mb(rss):.1f} MB peak"
    print("\nworker peak memory per request:\n  " + "\n  ".join(f"{k}: {v}" for k, v in figures.items()))
    assert_good(server, "good request after the images at their limits")


# --------------------------------------------------------------------------- many-part multipart
def _many_parts(n: int, distinct: bool) -> bytes:
    part = b'--x\r\nContent-Disposition: form-data; name="%s"\r\n\r\n1\r\n'
    return b"".join(part % (b"a%d" % i if distinct else b"a") for i in range(n)) + b"--x--\r\n"


def _handler_ms(server, skip: int, reason: str) -> float:
    """total_ms of the handler's batch line for the request refused with `reason`, logged after
    the first `skip` lines of model_log.log (the frontend writes the log: poll it briefly)."""
    deadline = time.monotonic() + 15
    while True:
        for line in server.model_log().splitlines()[skip:]:
            match = re.search(r"fmnist batch size=1 ok=0 errors=1 .*total_ms=([0-9.]+) bad: #0 \d+ (\w+)", line)
            if match and match.group(2) == reason:
                return float(match.group(1))
        assert time.monotonic() < deadline, f"no batch line for {reason} in model_log.log"
        time.sleep(0.2)


def test_many_part_multipart_is_refused_and_leaves_no_memory(server):
    """~98,000 one-byte parts under the 6.5 MB request limit (the amplification case). The
    frontend (Netty) decodes the parts and the worker receives each as a parameter before the
    handler runs; the handler then refuses the request at once. Measured: time, the JVM's and
    the workers' RSS. nginx (roles/torchserve_nginx) refuses such bodies before TorchServe in deployments."""
    multipart = {"Content-Type": "multipart/form-data; boundary=x"}
    pids = worker_pids(server)
    java = jvm_pid(server)
    jvm_before = status_kb(java, "VmRSS")
    workers_before = {pid: status_kb(pid, "VmRSS") for pid in pids}
    figures = []
    log_lines = len(server.model_log().splitlines())
    for distinct in (True, False, True):
        body = _many_parts(98_000 if distinct else 120_000, distinct)
        assert len(body) < 6_553_500
        rss = reset_peaks(pids)
        cpu = {pid: cpu_seconds(pid) for pid in [java, *pids]}
        t0 = time.perf_counter()
        resp = post(server, data=body, headers=multipart)
        seconds = time.perf_counter() - t0
        cpu = {pid: cpu_seconds(pid) - before for pid, before in cpu.items()}
        expected = ("too_many_fields", 400) if distinct else ("not_an_image", 415)  # one name: one field
        assert (resp.json().get("reason"), resp.status_code) == expected, resp.text[:300]
        handler_ms = _handler_ms(server, log_lines, expected[0])
        assert handler_ms < 100, handler_ms  # the handler's own part: a few milliseconds
        figures.append(
            f"{len(body) / MB:.1f} MB, {'distinct names' if distinct else 'one name'}: {resp.status_code} in {seconds:.2f} s; "
            f"CPU s: JVM {cpu[java]:.2f}, worker {max(cpu[p] for p in pids):.2f}; "
            f"handler {handler_ms:.1f} ms; worker peak +{peak_growth_mb(rss):.0f} MB, JVM RSS {status_kb(java, 'VmRSS') / 1024:.0f} MB"
        )
        log_lines = len(server.model_log().splitlines())
        assert_good(server, "good request after a many-part body")
    jvm_after = status_kb(java, "VmRSS")
    workers_after = {pid: status_kb(pid, "VmRSS") for pid in pids}
    print("\nmany-part multipart:\n  " + "\n  ".join(figures))
    print(f"JVM RSS {jvm_before / 1024:.0f} -> {jvm_after / 1024:.0f} MB; workers {workers_before} -> {workers_after} kB")
    # What a worker keeps afterwards is the worker core's (Python's allocator keeps the arenas the
    # 98,000 parameter objects used, for reuse): reported, not the handler's to bound.

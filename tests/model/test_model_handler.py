"""Unit tests of model_src/handler.py (and the decoding.py, preprocessing.py it uses), calling the
handler with a fake context."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import time
import struct
import zlib

import pytest
import torch
from fmnist_support import (
    BadInput,
    LABELS,
    SAMPLES,
    SEED_WEIGHTS,
    WEIGHTS,
    FakeContext,
    FashionMNISTHandler,
    FashionMNISTModelV2,
    MODEL_SRC,
    png_bytes,
    train,
    yaml_dict,
)
from PIL import Image

import preprocessing  # model_src/preprocessing.py (on sys.path through fmnist_support)

TSHIRT = "T-shirt/top"


# --------------------------------------------------------------------------- helpers
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A dark T-shirt photographed on white (RGB)."""
    return Image.open(SAMPLES / "tshirt3.jpeg").convert("RGB")


@pytest.fixture(scope="module")
def reference(handler, photo) -> torch.Tensor:
    """The tensor the handler makes of the photo sent as a lossless RGB PNG."""
    return handler.image_to_tensor(encode(photo, "PNG"))


def predict(handler, payload, content_type=None):
    headers = {0: {"Content-Type": content_type}} if content_type else {}
    ctx = FakeContext("/nonexistent", request_headers=headers)  # handle() never reads model_dir
    out = handler.handle([payload], ctx)
    return out[0], ctx


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def mean_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def spy_forward(handler) -> list:
    """Record the input shape of every forward pass (a lone image's network or the batches')."""
    calls = []
    for net in (handler.model, handler.batch_model):
        net.forward = lambda x, original=net.forward: calls.append(tuple(x.shape)) or original(x)
    return calls


def unspy_forward(handler) -> None:
    del handler.model.forward, handler.batch_model.forward


# --------------------------------------------------------------------------- initialisation
def test_initialize_reads_config_and_labels(handler):
    assert handler.labels == [json.loads(LABELS.read_text())[str(i)] for i in range(10)]
    assert handler.config["topk"] == 3
    assert handler.config["intra_op_threads"] == 1
    assert handler.config["max_image_pixels"] == 40_000_000
    assert torch.get_num_threads() == 1


def test_initialize_without_model_yaml_config(model_dir):
    h = FashionMNISTHandler()
    h.initialize(FakeContext(model_dir, yaml_config=None))  # no model_yaml_config attribute at all
    import os

    assert h.config["intra_op_threads"] == max(1, (os.cpu_count() or 1) // 1)
    assert h.config["topk"] == 3
    out, _ = predict(h, {"body": (SAMPLES / "tshirt3.jpeg").read_bytes()})
    assert out["label"] == TSHIRT


def test_default_threads_follow_min_workers(model_dir):
    import os

    h = FashionMNISTHandler()
    h.initialize(FakeContext(model_dir, yaml_config={"minWorkers": 2}))
    assert h.config["intra_op_threads"] == max(1, (os.cpu_count() or 1) // 2)
    torch.set_num_threads(1)


def test_topk_is_configurable(model_dir):
    h = FashionMNISTHandler()
    h.initialize(FakeContext(model_dir, yaml_config={"handler": {"topk": 10, "intra_op_threads": 1}}))
    out, _ = predict(h, {"body": (SAMPLES / "tshirt4.jpg").read_bytes()})
    assert len(out["probabilities"]) == 10
    assert abs(sum(out["probabilities"].values()) - 1.0) < 1e-4


def test_labels_come_from_model_dir(tmp_path):
    shutil.copy(MODEL_SRC / "model.py", tmp_path)
    shutil.copy(WEIGHTS, tmp_path)
    h = FashionMNISTHandler()
    with pytest.raises(RuntimeError, match="index_to_name.json"):
        h.initialize(FakeContext(tmp_path, yaml_config={}))
    renamed = {str(i): f"class-{i}" for i in range(10)}
    (tmp_path / "index_to_name.json").write_text(json.dumps(renamed))
    h.initialize(FakeContext(tmp_path, yaml_config={"handler": {"intra_op_threads": 1}}))
    out, _ = predict(h, {"body": (SAMPLES / "tshirt3.jpeg").read_bytes()})
    assert out["label"] == "class-0"


@pytest.mark.parametrize("hidden", [10, 16])
def test_width_is_inferred_from_the_state_dict(tmp_path, hidden):
    shutil.copy(MODEL_SRC / "model.py", tmp_path)
    shutil.copy(LABELS, tmp_path)
    torch.save(FashionMNISTModelV2(hidden_units=hidden).state_dict(), tmp_path / WEIGHTS.name)
    h = FashionMNISTHandler()
    h.initialize(FakeContext(tmp_path, yaml_config={"handler": {"intra_op_threads": 1}}))
    assert h.model.block_1[0].out_channels == hidden


def test_article_weights_served_by_the_handler(tmp_path):
    shutil.copy(MODEL_SRC / "model.py", tmp_path)
    shutil.copy(LABELS, tmp_path)
    shutil.copy(SEED_WEIGHTS, tmp_path / WEIGHTS.name)
    h = FashionMNISTHandler()
    h.initialize(FakeContext(tmp_path, yaml_config={"handler": {"intra_op_threads": 1}}))
    assert h.model.block_1[0].out_channels == 10
    out, _ = predict(h, {"body": (SAMPLES / "tshirt3.jpeg").read_bytes()})
    assert out["index"] == 0 and out["label"] == TSHIRT, out  # the article's model gets the photo right too


# --------------------------------------------------------------------------- accepted formats
def test_seed_photos_are_tshirts(handler):
    for name in ("tshirt3.jpeg", "tshirt4.jpg"):
        out, ctx = predict(handler, {"body": (SAMPLES / name).read_bytes()})
        assert out["label"] == TSHIRT, (name, out)
        assert out["index"] == 0
        assert list(out["probabilities"])[0] == TSHIRT and len(out["probabilities"]) == 3
        assert ctx.statuses == {}
        assert ctx.response_headers[0]["content-type"] == "application/json"


def test_dataset_images_pass_through_unchanged(handler, test_set):
    images, _ = test_set
    for i in range(0, 10_000, 97):
        t = handler.image_to_tensor(png_bytes(images[i]))
        assert torch.equal(t, train.to_float(images[i : i + 1])[0]), i


@pytest.mark.parametrize(
    "fmt,kw,tol",
    [
        ("JPEG", {"quality": 95}, 0.05),
        ("PNG", {}, 0.0),
        ("GIF", {}, 0.03),
        ("WEBP", {"lossless": True}, 0.0),
        ("WEBP", {"quality": 90}, 0.05),
        ("BMP", {}, 0.0),
    ],
)
def test_formats(handler, photo, reference, fmt, kw, tol):
    data = encode(photo, fmt, **kw)
    t = handler.image_to_tensor(data)
    assert t.shape == (1, 28, 28)
    assert mean_diff(t, reference) <= tol + 1e-6, (fmt, mean_diff(t, reference))
    out, _ = predict(handler, {"body": data})
    assert out["label"] == TSHIRT


def test_png_grayscale_and_palette(handler, photo, reference):
    gray = handler.image_to_tensor(encode(photo.convert("L"), "PNG"))
    assert mean_diff(gray, reference) < 0.01
    pal = handler.image_to_tensor(encode(photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"))
    assert mean_diff(pal, reference) < 0.03
    assert predict(handler, {"body": encode(photo.convert("P"), "PNG")})[0]["label"] == TSHIRT


def test_png_16_bit(handler, photo, reference):
    gray = photo.convert("L")
    img16 = Image.frombytes("I;16", gray.size, b"".join(struct.pack("<H", v * 257) for v in gray.tobytes()))
    data = encode(img16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit
    t = handler.image_to_tensor(data)
    assert mean_diff(t, reference) < 0.01  # 16-bit values scaled, not clipped to white
    assert predict(handler, {"body": data})[0]["label"] == TSHIRT


def test_png_alpha_is_composited_on_white(handler, photo, reference):
    # Transparent background stored as transparent *black*: wrong without compositing.
    rgba = photo.convert("RGBA")
    light = [255 if v > 235 else 0 for v in range(256)]
    mask = photo.convert("L").point(light)
    rgba.paste((0, 0, 0, 0), mask=mask)
    data = encode(rgba, "PNG")
    t = handler.image_to_tensor(data)
    assert mean_diff(t, reference) < 0.03
    assert predict(handler, {"body": data})[0]["label"] == TSHIRT
    # palette PNG with a transparent index
    pal = rgba.convert("P", palette=Image.Palette.ADAPTIVE)
    assert "transparency" in Image.open(io.BytesIO(encode(pal, "PNG"))).info
    assert predict(handler, {"body": encode(pal, "PNG")})[0]["label"] == TSHIRT


def test_gif_first_frame(handler, photo, reference):
    black = Image.new("RGB", photo.size, (0, 0, 0))
    white = Image.new("RGB", photo.size, (255, 255, 255))
    data = encode(photo, "GIF", save_all=True, append_images=[black, white], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames >= 2
    assert mean_diff(handler.image_to_tensor(data), reference) < 0.03


def test_exif_orientation(handler, photo, reference):
    sideways = photo.transpose(Image.Transpose.ROTATE_90)  # stored rotated ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and tagged "rotate 90 CW to display"
    data = encode(sideways, "JPEG", quality=95, exif=exif.tobytes())
    assert mean_diff(handler.image_to_tensor(data), reference) < 0.05
    assert predict(handler, {"body": data})[0]["label"] == TSHIRT


def test_large_photo_is_downscaled(handler, photo, reference):
    big = photo.resize((photo.width * 8, photo.height * 8), Image.Resampling.BICUBIC)
    data = encode(big, "JPEG", quality=90)
    assert mean_diff(handler.image_to_tensor(data), reference) < 0.05


def test_light_and_dark_backgrounds(handler, photo):
    """A photo on white is inverted; the same garment on black (dataset style) is not."""
    on_white = handler.image_to_tensor(encode(photo, "PNG"))
    on_black = handler.image_to_tensor(encode(Image.eval(photo.convert("L"), lambda v: 255 - v), "PNG"))
    assert mean_diff(on_white, on_black) < 0.02
    border = torch.cat([on_white[0, 0], on_white[0, -1], on_white[0, :, 0], on_white[0, :, -1]])
    assert float(border.mean()) < 0.1  # background black, like Fashion-MNIST


# --------------------------------------------------------------------------- request shapes
def test_payload_shapes(handler):
    jpg = (SAMPLES / "tshirt3.jpeg").read_bytes()
    b64 = base64.b64encode(jpg).decode()
    cases = {
        "raw body (curl -T / octet-stream)": ({"body": jpg}, None),
        "raw data key": ({"data": jpg}, None),
        "bytearray": ({"body": bytearray(jpg)}, None),
        "multipart field data": ({"data": jpg}, "multipart/form-data; boundary=x"),
        "multipart other field name": ({"upload": jpg}, "multipart/form-data; boundary=x"),
        "JSON decoded by TorchServe": ({"body": {"data": b64}}, "application/json"),
        "JSON sent as octet-stream": ({"body": json.dumps({"data": b64}).encode()}, "application/octet-stream"),
        "bare base64 text/plain (str)": ({"body": b64}, "text/plain"),
        "bare base64 bytes": ({"body": b64.encode()}, None),
        "base64 with newlines": ({"body": base64.encodebytes(jpg)}, None),
        "data URL": ({"body": "data:image/jpeg;base64," + b64}, "text/plain"),
        "JSON string": ({"body": b64}, "application/json"),
        'JSON key "image"': ({"body": {"image": b64}}, "application/json"),
        'JSON key "b64"': ({"body": {"b64": b64}}, "application/json"),
        'raw JSON bytes, key "image"': ({"body": json.dumps({"image": b64}).encode()}, "application/json"),
        'raw JSON bytes, key "b64"': ({"body": json.dumps({"b64": b64}).encode()}, "application/json"),
        "raw JSON string bytes": ({"body": json.dumps(b64).encode()}, "application/json"),
    }
    for name, (row, ct) in cases.items():
        out, ctx = predict(handler, row, ct)
        assert out.get("label") == TSHIRT, (name, out)
        assert ctx.statuses == {}, name


def form_decode(body: bytes) -> dict:
    """What TorchServe 0.12 (Netty 4.1.53) hands the handler for an x-www-form-urlencoded body."""
    from urllib.parse import unquote_plus

    row = {}
    for part in body.split(b"&"):
        if b"=" not in part:
            continue  # Netty drops a trailing field without '='
        name, value = part.split(b"=", 1)
        row[unquote_plus(name.decode("utf-8", "replace"))] = unquote_plus(value.decode("utf-8", "replace")).encode()
    return row


def test_form_urlencoded_base64_is_recovered(handler):
    ct = "application/x-www-form-urlencoded"
    jpg = (SAMPLES / "tshirt3.jpeg").read_bytes()
    for data in (jpg, jpg + b"\0", jpg + b"\0\0"):  # all three base64 paddings (bytes after EOI are ignored)
        b64 = base64.b64encode(data)
        if not b64.endswith(b"="):
            continue  # no '=' at all: Netty drops the whole body (covered below)
        assert b"+" in b64 or b"/" in b64
        out, ctx = predict(handler, form_decode(b64), ct)  # curl --data-binary @img.b64
        assert out.get("label") == TSHIRT, out
    # curl -d "data=<base64>" ('+' arrives as ' ') and --data-urlencode data@img.b64
    b64 = base64.b64encode(jpg)
    assert predict(handler, form_decode(b"data=" + b64), ct)[0]["label"] == TSHIRT
    from urllib.parse import quote_plus

    assert predict(handler, form_decode(b"data=" + quote_plus(b64).encode()), ct)[0]["label"] == TSHIRT


def test_form_body_relabelled_as_octet_stream_is_recovered(handler):
    # The nginx site turns form-urlencoded into octet-stream (so curl --data-binary @img.jpg
    # survives); a real form body "data=<base64>" must still work then, escaped or not.
    from urllib.parse import quote_plus

    b64 = base64.b64encode((SAMPLES / "tshirt3.jpeg").read_bytes())
    assert b"+" in b64
    for body in (b"data=" + b64, b"data=" + quote_plus(b64).encode(), b"image=" + b64 + b"&x=1"):
        out, ctx = predict(handler, body, "application/octet-stream")
        assert out.get("label") == TSHIRT, (body[:20], out)
    out, ctx = predict(handler, b"data=not base64 at all!", "application/octet-stream")
    assert ctx.statuses[0][0] == 400 and out["reason"] == "bad_base64", out


def test_form_urlencoded_binary_gets_a_helpful_415(handler, photo):
    ct = "application/x-www-form-urlencoded"
    png = encode(photo, "PNG")
    for row in (form_decode(png), {}):  # mangled binary; body dropped entirely
        out, ctx = predict(handler, row, ct)
        assert ctx.statuses[0][0] == 415, out
        assert out["code"] == 415 and out["reason"] == "form_urlencoded"
        assert "application/octet-stream" in out["error"]


# --------------------------------------------------------------------------- bad input
def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (8-bit gray) with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A real decompression bomb: 8000x8000 = 64 Mpx of zeros in a ~10 KB PNG."""
    return encode(Image.new("1", (8000, 8000)), "PNG")


def bad_inputs(bomb_png: bytes) -> dict:
    jpg = (SAMPLES / "tshirt4.jpg").read_bytes()
    return {
        "empty body": ({"body": b""}, 400, "empty_body"),
        "no body at all": ({}, 400, "empty_body"),
        "not an image (text)": ({"body": b"hello, this is not an image"}, 415, "not_an_image"),
        "not an image (binary)": ({"body": bytes(range(256)) * 4}, 415, "not_an_image"),
        "base64 of not an image": ({"body": base64.b64encode(b"plain text, no image")}, 415, "not_an_image"),
        "truncated JPEG": ({"body": jpg[: len(jpg) // 2]}, 400, "corrupt_image"),
        "truncated PNG": ({"body": encode(Image.new("L", (64, 64), 128), "PNG")[:60]}, 400, "corrupt_image"),
        "header-only PNG 100000x100000": ({"body": png_header_only(100_000, 100_000)}, 413, "image_too_large"),
        "decompression bomb 8000x8000": ({"body": bomb_png}, 413, "image_too_large"),
        "1x1 image": ({"body": encode(Image.new("L", (1, 1), 200), "PNG")}, 422, "image_too_small"),
        "1000x1 image": ({"body": encode(Image.new("L", (1000, 1), 200), "PNG")}, 422, "image_too_small"),
        "JSON without data": ({"body": {"foo": "bar"}}, 400, "bad_json"),
        "JSON list": ({"body": [1, 2, 3]}, 400, "bad_json"),
        "JSON with bad base64": ({"body": {"data": "!!!not base64!!!"}}, 400, "bad_base64"),
    }


def test_bad_inputs_each_get_their_status(handler, bomb_png):
    for name, (row, code, reason) in bad_inputs(bomb_png).items():
        out, ctx = predict(handler, row)
        assert ctx.statuses.get(0, (200,))[0] == code, (name, out)
        assert out == {"error": out["error"], "code": code, "reason": reason}, (name, out)
        assert isinstance(out["error"], str) and out["error"], name
        assert ctx.response_headers[0]["content-type"] == "application/json"


def test_pixel_cap_is_configurable(model_dir):
    h = FashionMNISTHandler()
    h.initialize(FakeContext(model_dir, yaml_config={"handler": {"max_image_pixels": 10_000, "intra_op_threads": 1}}))
    ok = encode(Image.new("L", (100, 100), 50), "PNG")
    too_big = encode(Image.new("L", (101, 100), 50), "PNG")
    assert "label" in predict(h, {"body": ok})[0]
    out, ctx = predict(h, {"body": too_big})
    assert ctx.statuses[0][0] == 413 and "10000" in out["error"]
    Image.MAX_IMAGE_PIXELS = 40_000_000  # restore the module-wide value other tests expect


def test_batch_with_bad_items(handler, bomb_png, test_set):
    """Bad requests get their own status; the good ones of the same batch one forward pass."""
    images, _ = test_set
    good = [png_bytes(images[i]) for i in range(5)]
    rows = [
        {"body": good[0]},
        {"body": b""},
        {"body": good[1]},
        {"body": b"not an image"},
        {"body": good[2]},
        {"body": bomb_png},
        {"body": encode(Image.new("L", (1, 1)), "PNG")},
        {"body": good[3]},
    ]
    calls = spy_forward(handler)
    try:
        ctx = FakeContext("/nonexistent")
        out = handler.handle(rows, ctx)
    finally:
        unspy_forward(handler)
    assert calls == [(4, 1, 28, 28)]  # one forward pass for the 4 good requests
    assert {i: s[0] for i, s in ctx.statuses.items()} == {1: 400, 3: 415, 5: 413, 6: 422}
    direct = train.predict(handler.model, train.to_float(images[:4]))
    for i, k in zip((0, 2, 4, 7), range(4)):
        assert out[i]["index"] == int(direct[k]), (i, out[i])
    assert all(ctx.response_headers[i]["content-type"] == "application/json" for i in range(len(rows)))


def test_batch_of_only_bad_items_makes_no_forward_pass(handler):
    calls = spy_forward(handler)
    try:
        ctx = FakeContext("/nonexistent")
        out = handler.handle([{"body": b""}, {"body": b"x"}], ctx)
        assert [o["code"] for o in out] == [400, 415]
        assert calls == []
        assert "label" in handler.handle([{"body": (SAMPLES / "tshirt3.jpeg").read_bytes()}], ctx)[0]
    finally:
        unspy_forward(handler)
    assert calls == [(1, 1, 28, 28)]  # the spy does see a forward pass


def test_unexpected_error_is_contained(handler, monkeypatch):
    jpg = (SAMPLES / "tshirt3.jpeg").read_bytes()
    real = handler.preprocessor.to_model_image
    calls = {"n": 0}

    def flaky(img):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ZeroDivisionError("boom")
        return real(img)

    monkeypatch.setattr(handler.preprocessor, "to_model_image", flaky)
    ctx = FakeContext("/nonexistent")
    out = handler.handle([{"body": jpg}, {"body": jpg}], ctx)
    assert ctx.statuses[0][0] == 400 and out[0]["reason"] == "bad_input"
    assert out[1]["label"] == TSHIRT


def test_yaml_contract_parses(handler):
    cfg = FashionMNISTHandler._read_config(yaml_dict())
    assert cfg["topk"] == 3 and cfg["intra_op_threads"] == 1 and cfg["max_image_pixels"] == 40_000_000
    with pytest.raises(ValueError):
        FashionMNISTHandler._read_config({"handler": {"invert": "sometimes"}})


# --------------------------------------------------------------------------- hostile bodies
RAW_ONLY = object()
#: JSON that is not {"<image key>": "<base64>"}: (what the worker may have decoded, raw body).
#: (A decoded null is indistinguishable from no body: 400 empty_body, tested above.)
NON_IMAGE_JSON = {
    "big number": (3000000000, b"3000000000"),
    "negative number": (-1, b"-1"),
    "float": (1e308, b"1e308"),
    "null": (RAW_ONLY, b"null"),
    "true": (True, b"true"),
    "false": (False, b"false"),
    "empty list": ([], b"[]"),
    "list of numbers": ([3000000000] * 3, b"[3000000000, 3000000000, 3000000000]"),
    "empty object": ({}, b"{}"),
    "object without an image field": ({"foo": "bar"}, b'{"foo": "bar"}'),
    "image field a number": ({"data": 3000000000}, b'{"data": 3000000000}'),
    "image field null": ({"data": None}, b'{"data": null}'),
    "image field a list": ({"data": [1, 2]}, b'{"data": [1, 2]}'),
    "image field an object": ({"data": {"data": "x"}}, b'{"data": {"data": "x"}}'),
    "deep nesting (lists)": (RAW_ONLY, b"[" * 100_000 + b"]" * 100_000),
    "deep nesting (objects)": (RAW_ONLY, b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    "a million numbers": (RAW_ONLY, b"[" + b"0," * 1_000_000 + b"0]"),
    "a million keys": (RAW_ONLY, b"{" + b",".join(b'"k%d":1' % i for i in range(300_000)) + b"}"),
    "a 100,000-digit number": (RAW_ONLY, b'{"data": ' + b"9" * 100_000 + b"}"),
}


@pytest.mark.parametrize("name", list(NON_IMAGE_JSON))
def test_non_image_json_is_refused_at_once(handler, name):
    decoded, raw = NON_IMAGE_JSON[name]
    rows = [{"body": raw}] if decoded is RAW_ONLY else [{"body": decoded}, {"body": raw}]
    for row in rows:
        t0 = time.perf_counter()
        out, ctx = predict(handler, row, "application/json")
        elapsed = time.perf_counter() - t0
        assert ctx.statuses[0][0] == 400 and out["reason"] == "bad_json", (name, out)
        assert out["error"] == BadInput("bad_json").message
        assert elapsed < 0.5, (name, elapsed)  # classified, never parsed into a structure


def test_too_many_fields_or_parts(handler):
    jpg = (SAMPLES / "tshirt3.jpeg").read_bytes()
    row = {"data": jpg, **{f"f{i}": b"1" for i in range(8)}}  # 9 parts
    out, ctx = predict(handler, row, "multipart/form-data; boundary=x")
    assert ctx.statuses[0][0] == 400 and out["reason"] == "too_many_fields", out
    assert "label" in predict(handler, dict(list(row.items())[:8]), "multipart/form-data; boundary=x")[0]
    t0 = time.perf_counter()
    out, ctx = predict(handler, {f"a{i}": b"1" for i in range(98_000)}, "multipart/form-data; boundary=x")
    assert out["reason"] == "too_many_fields" and time.perf_counter() - t0 < 0.5
    # A form body relabelled as octet-stream (nginx) with many fields: refused before splitting.
    out, ctx = predict(handler, {"body": b"data=" + b"&x=1" * 100_000}, "application/octet-stream")
    assert out["reason"] == "too_many_fields", out


def test_empty_base64(handler):
    for row, ct in (
        ({"body": {"data": ""}}, "application/json"),
        ({"body": b'{"data": ""}'}, "application/json"),
        ({"body": b"===="}, "text/plain"),
        ({"body": "data:image/png;base64,"}, "text/plain"),
        ({"body": b"data="}, "application/octet-stream"),
    ):
        out, ctx = predict(handler, row, ct)
        assert ctx.statuses[0][0] == 400 and out["reason"] == "empty_body", (row, out)


def test_mpo_first_frame(handler, photo, reference):
    """Phones write MPO (a JPEG with more pictures after it): the first picture is used."""
    data = encode(photo, "MPO", save_all=True, append_images=[Image.new("RGB", photo.size, (0, 0, 0))], quality=95)
    img = Image.open(io.BytesIO(data))
    assert img.format == "MPO" and img.n_frames == 2
    assert mean_diff(handler.image_to_tensor(data), reference) < 0.05
    assert predict(handler, {"body": data})[0]["label"] == TSHIRT


def refused_formats(photo) -> dict:
    small = photo.resize((64, 60))
    tiff_pages = encode(small, "TIFF", save_all=True, append_images=[Image.new("RGB", (64, 60))])
    return {
        "TIFF": encode(small, "TIFF"),
        "multi-page TIFF": tiff_pages,
        "ICO": encode(small, "ICO"),
        "PPM": encode(small, "PPM"),
        "TGA": encode(small, "TGA"),
        "PCX": encode(small, "PCX"),
        "JPEG 2000": encode(small, "JPEG2000"),
        "EPS header": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 60\n",
        "PSD header": b"8BPS\x00\x01" + b"\x00" * 40,
    }


def test_formats_outside_the_list_are_refused(handler, photo):
    for name, data in refused_formats(photo).items():
        for row in ({"body": data}, {"body": {"data": base64.b64encode(data).decode()}}):
            out, ctx = predict(handler, row)
            assert ctx.statuses[0][0] == 415 and out["reason"] == "not_an_image", (name, out)
            assert "JPEG, PNG, GIF, WebP or BMP" in out["error"]


def test_invert_always_and_never(model_dir, photo, test_set):
    def make(mode):
        h = FashionMNISTHandler()
        h.initialize(FakeContext(model_dir, yaml_config={"handler": {"invert": mode, "intra_op_threads": 1}}))
        return h

    on_white = encode(photo, "PNG")
    dataset_img = png_bytes(test_set[0][0])  # light garment on black
    auto, always, never = make("auto"), make("always"), make("never")
    # mostly black (light garment on black) or mostly white (dark garment on white)
    assert float(auto.image_to_tensor(on_white).mean()) < 0.5 < float(never.image_to_tensor(on_white).mean())
    assert float(auto.image_to_tensor(dataset_img).mean()) < 0.5 < float(always.image_to_tensor(dataset_img).mean())
    assert float(never.image_to_tensor(dataset_img).mean()) < 0.5


def test_min_image_side(model_dir):
    h = FashionMNISTHandler()
    h.initialize(FakeContext(model_dir, yaml_config={"handler": {"min_image_side": 20, "intra_op_threads": 1}}))
    out, ctx = predict(h, {"body": encode(Image.new("L", (19, 40), 200), "PNG")})
    assert ctx.statuses[0][0] == 422 and out["reason"] == "image_too_small" and "20 pixels" in out["error"], out
    assert "label" in predict(h, {"body": encode(Image.new("L", (20, 40), 200), "PNG")})[0]


def test_pixel_limit_follows_the_decoding_cost(handler):
    """max_image_memory_mb (64): formats that cost more memory per pixel get a lower pixel limit."""
    def limit(img, fmt, **kw):
        return handler.preprocessor.pixel_limit(Image.open(io.BytesIO(encode(img, fmt, **kw))))

    rgb = Image.new("RGB", (64, 48))
    mb64 = 64 * 2**20
    assert limit(rgb, "WEBP") == mb64 // 16
    assert limit(rgb, "PNG") == int(mb64 / 4.5)
    assert limit(rgb.convert("L"), "PNG") == mb64 // 2
    assert limit(rgb, "JPEG", subsampling=2) == int(mb64 / 3.25)  # 4:2:0: 1.5 coefficients per pixel
    assert limit(rgb, "JPEG", subsampling=0) == int(mb64 / 6.25)
    # just above the WebP limit: refused from the header, before decoding
    side = int((mb64 / 16) ** 0.5) + 1
    out, ctx = predict(handler, {"body": encode(Image.new("RGB", (side, side)), "WEBP", lossless=True)})
    assert ctx.statuses[0][0] == 413 and out["reason"] == "image_too_large", out
    assert str(mb64 // 16) in out["error"]


def test_large_images_are_shrunk_before_conversion(handler):
    for mode, fmt in (("RGBA", "PNG"), ("LA", "PNG"), ("RGB", "PNG"), ("P", "GIF"), ("1", "PNG"), ("L", "JPEG")):
        img = handler.preprocessor.decode_image(encode(Image.new(mode, (3000, 2000)), fmt))
        assert min(img.size) < 2 * preprocessing.WORK_SIDE and img.mode in (mode, "L"), (mode, fmt, img.size, img.mode)
    big16 = Image.new("I;16", (3000, 2000), 40000)
    img = handler.preprocessor.decode_image(encode(big16, "PNG"))
    assert min(img.size) < 2 * preprocessing.WORK_SIDE and img.mode.startswith("I;16")


def test_error_texts_are_fixed_and_logged_in_one_line(handler, bomb_png, caplog):
    """Clients get our sentences, never a library's exception text; the details go to the log,
    one line per batch and no traceback."""
    fixed = {reason: BadInput(reason).message for reason in ("corrupt_image", "not_an_image", "bad_base64", "bad_json")}
    rows = [v[0] for v in bad_inputs(bomb_png).values()]
    caplog.set_level(logging.DEBUG, logger="handler")
    caplog.clear()
    ctx = FakeContext("/nonexistent")
    out = handler.handle(rows, ctx)
    for o in out:
        if o["reason"] in fixed:
            assert o["error"] == fixed[o["reason"]], o
        assert "Error" not in o["error"] and "0x" not in o["error"], o
    records = [r for r in caplog.records if r.name == "handler"]
    assert len(records) == 1 and records[0].exc_info is None, [r.getMessage() for r in records]
    line = records[0].getMessage()
    assert "\n" not in line and f"errors={len(rows)}" in line and "corrupt_image (" in line, line


def test_unexpected_error_is_one_log_line(handler, monkeypatch, caplog):
    monkeypatch.setattr(handler.preprocessor, "to_model_image", lambda img: 1 / 0)
    caplog.set_level(logging.DEBUG, logger="handler")
    caplog.clear()
    out, ctx = predict(handler, {"body": (SAMPLES / "tshirt3.jpeg").read_bytes()})
    assert ctx.statuses[0][0] == 400 and out["reason"] == "bad_input"
    assert out["error"] == "The request could not be processed."
    records = [r for r in caplog.records if r.name == "handler"]
    assert len(records) == 1 and records[0].exc_info is None
    assert "ZeroDivisionError" in records[0].getMessage() and "\n" not in records[0].getMessage()


def test_worker_hands_json_over_undecoded(handler):
    """initialize() turns off the worker's own JSON/text decoding, which would parse any
    document (any depth, any size) before the handler runs."""
    assert os.environ.get("TS_DECODE_INPUT_REQUEST") == "false"


# --------------------------------------------------------------------------- explanations
def explain_ctx(n: int, explain: set[int]) -> FakeContext:
    return FakeContext("/nonexistent", request_headers={i: {"explain": "True" if i in explain else "False"} for i in range(n)})


def test_explanation_is_integrated_gradients_of_the_prediction(handler):
    jpg = (SAMPLES / "tshirt3.jpeg").read_bytes()
    ctx = explain_ctx(1, {0})
    out = handler.handle([{"body": jpg}], ctx)[0]
    plain, _ = predict(handler, {"body": jpg})
    assert {k: out[k] for k in plain} == plain  # the same label, index and probabilities
    amap = torch.tensor(out["attributions"])
    assert amap.shape == (28, 28) and out["method"] == "integrated_gradients" and out["n_steps"] == 64
    # Completeness of IG: the map sums to the target logit's rise from the black baseline.
    x = handler.image_to_tensor(jpg).unsqueeze(0)
    with torch.no_grad():
        rise = float(handler.model(x)[0, out["index"]] - handler.model(torch.zeros_like(x))[0, out["index"]])
    assert abs(float(amap.sum()) - rise) < 0.05 * abs(rise) + 0.05, (float(amap.sum()), rise)
    # Pixels that are background (0) in the model's input get no attribution.
    assert bool((amap[x[0, 0] == 0] == 0).all())
    assert ctx.response_headers[0]["content-type"] == "application/json"


def test_batch_mixes_explanations_predictions_and_errors(handler, test_set, caplog):
    images, _ = test_set
    rows = [{"body": png_bytes(images[i])} for i in range(3)] + [{"body": b"junk"}, {"body": png_bytes(images[3])}]
    ctx = explain_ctx(len(rows), {1, 3, 4})
    caplog.set_level(logging.INFO, logger="handler")
    caplog.clear()
    out = handler.handle(rows, ctx)
    direct = train.predict(handler.model, train.to_float(images[:4]))
    assert "attributions" not in out[0] and "attributions" not in out[2]
    assert len(out[1]["attributions"]) == 28 and len(out[4]["attributions"]) == 28
    assert [out[i]["index"] for i in (0, 1, 2, 4)] == [int(direct[i]) for i in range(4)]
    assert out[3]["reason"] == "not_an_image" and ctx.statuses[3][0] == 415
    lines = [r.getMessage() for r in caplog.records if r.name == "handler"]
    assert len(lines) == 1 and "size=5 ok=4 errors=1 explained=2" in lines[0], lines


def test_explanation_cost_is_configurable(model_dir):
    h = FashionMNISTHandler()
    h.initialize(FakeContext(model_dir, yaml_config={"handler": {"intra_op_threads": 1, "explain_n_steps": 8, "explain_internal_batch_size": 4}}))
    calls = []
    real = h.model.forward
    h.model.forward = lambda x: calls.append(x.shape[0]) or real(x)
    try:
        out = h.handle([{"body": (SAMPLES / "tshirt4.jpg").read_bytes()}], explain_ctx(1, {0}))[0]
    finally:
        del h.model.forward
    assert out["n_steps"] == 8 and out["label"] == TSHIRT
    assert calls[0] == 1 and calls[1:] == [4, 4], calls  # the prediction, then 8 steps in chunks of 4
    for bad in ({"explain_n_steps": 1}, {"explain_n_steps": 100_000}, {"explain_internal_batch_size": 0}):
        with pytest.raises(ValueError, match="explain_"):
            FashionMNISTHandler._read_config({"handler": bad})


def test_failed_explanation_is_a_500_for_those_requests_only(handler, monkeypatch):
    def broken(inputs, targets):
        raise RuntimeError("no captum")

    monkeypatch.setattr(handler, "attribute", broken)
    jpg = (SAMPLES / "tshirt3.jpeg").read_bytes()
    ctx = explain_ctx(2, {1})
    out = handler.handle([{"body": jpg}, {"body": jpg}], ctx)
    assert out[0]["label"] == TSHIRT and 0 not in ctx.statuses
    assert ctx.statuses[1] == (500, "Internal Server Error")
    assert out[1] == {"error": "The explanation could not be computed.", "code": 500, "reason": "explanation_failed"}

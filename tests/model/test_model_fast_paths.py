"""The handler's cheap paths give the answers of the plain ones: JPEGs decoded at reduced size
(preprocessing.WORK_SIDE, Image.draft) against a full-size decode, and batches run through the
channels-last copy of the network against one image at a time."""

from __future__ import annotations

import io
import random

import pytest
import torch
from fmnist_support import SAMPLES, FakeContext, png_bytes, train
from PIL import Image

import preprocessing  # model_src/preprocessing.py (on sys.path through fmnist_support)

FULL_SIZE = 10**9  # a work side no image reaches: no draft, no shrink


def photo_style(img_u8: torch.Tensor, rng: random.Random) -> bytes:
    """A test-set garment as a phone photo: dark on a light background, hundreds of pixels a
    side, colour JPEG with 4:2:0 subsampling."""
    img = Image.frombytes("L", (28, 28), img_u8.numpy().tobytes())
    width = rng.randrange(300, 900)
    img = img.resize((width, round(width * rng.uniform(0.75, 1.35))), Image.Resampling.BICUBIC)
    img = Image.eval(img, lambda v: 255 - v).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.choice((80, 90)), subsampling="4:2:0")
    return buf.getvalue()


def labels(handler, bodies: list[bytes]) -> list[int]:
    """Each body alone through the handler (batch 1)."""
    out = []
    for body in bodies:
        res = handler.handle([{"body": body}], FakeContext("/nonexistent"))[0]
        assert "index" in res, res
        out.append(res["index"])
    return out


@pytest.fixture(scope="module")
def photos(test_set):
    images, truth = test_set
    rng = random.Random(7)
    picked = list(range(3, 10_000, 25))  # 400 images, every class
    return [photo_style(images[i], rng) for i in picked], [int(truth[i]) for i in picked]


def test_reduced_decoding_keeps_the_labels(handler, photos, monkeypatch):
    bodies, truth = photos
    samples = [p.read_bytes() for p in sorted(SAMPLES.iterdir())]
    assert preprocessing.WORK_SIDE < 200  # the cheap path is really on
    small_photos, small_samples = labels(handler, bodies), labels(handler, samples)
    monkeypatch.setattr(preprocessing, "WORK_SIDE", FULL_SIZE)
    full_photos, full_samples = labels(handler, bodies), labels(handler, samples)

    assert small_samples == full_samples == [0] * len(samples)  # the sample T-shirts stay T-shirts
    agree = sum(a == b for a, b in zip(small_photos, full_photos)) / len(bodies)
    acc_small = sum(a == t for a, t in zip(small_photos, truth)) / len(bodies)
    acc_full = sum(a == t for a, t in zip(full_photos, truth)) / len(bodies)
    assert agree >= 0.99, (agree, acc_small, acc_full)
    assert acc_small >= acc_full - 0.005, (acc_small, acc_full)
    assert acc_full > 0.8, acc_full  # the photo-style set is a fair test of the labels


def test_reduced_decoding_is_smaller(handler, photos):
    """The work image of a photo is at most twice WORK_SIDE on its shorter side (was 2 x 256)."""
    bodies, _ = photos
    for body in bodies[:20]:
        img = handler.preprocessor.decode_image(body)
        assert preprocessing.WORK_SIDE <= min(img.size) < 2 * preprocessing.WORK_SIDE, img.size


def test_test_set_accuracy_is_unchanged(handler, test_set, direct_predictions):
    """Dataset images (28x28 PNGs) through the handler, in batches of 8: the committed model's own
    predictions on every one of 2,000 test images."""
    images, _ = test_set
    picked = list(range(0, 10_000, 5))
    got = []
    for start in range(0, len(picked), 8):
        rows = [{"body": png_bytes(images[i])} for i in picked[start : start + 8]]
        got += [r["index"] for r in handler.handle(rows, FakeContext("/nonexistent"))]
    assert got == [int(direct_predictions[i]) for i in picked]


@pytest.mark.parametrize("size", [2, 8, 32])
def test_batches_answer_as_single_images(handler, test_set, size):
    images, _ = test_set
    x = train.to_float(images[100 : 100 + size]).reshape(size, 1, 28, 28)
    batched = handler.inference(x)
    single = torch.cat([handler.inference(x[i : i + 1]) for i in range(size)])
    assert torch.equal(batched.argmax(1), single.argmax(1))
    assert torch.allclose(batched, single, atol=1e-5), float((batched - single).abs().max())

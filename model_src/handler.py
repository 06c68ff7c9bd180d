"""TorchServe handler for the Fashion-MNIST TinyVGG (model.py).

One class-level handler (TorchServe requires exactly one class in this file).
See model_src/README.md for the accepted inputs, the preprocessing, the
response format, the error codes and the configuration keys.

Batching: the N requests TorchServe hands over in one call become one
[N, 1, 28, 28] tensor and one forward pass. A request whose input is bad gets
its own 4xx status (context.set_response_status(code, phrase, idx)) and a JSON
error; the other requests of the batch are answered normally. This works in
TorchServe 0.12 because the batch-level code stays 200 and the frontend then
uses each prediction's own status code and phrase; raising an exception
instead would fail the whole batch.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import json
import logging
import os
import time
import urllib.parse
import warnings

import torch
from PIL import Image, ImageOps
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import list_classes_from_module

logger = logging.getLogger(__name__)
Image.init()  # register every Pillow plugin, so that Image.open(formats=...) knows them all

#: Formats Pillow may use to decode a request (the JPEG opener also returns MPO, what many
#: phones write). Restricting Image.open to these keeps exotic decoders out of reach.
ALLOWED_FORMATS = tuple(f for f in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF") if f in Image.OPEN)
#: Magic numbers of those formats: bytes starting so are decoded as an image, not as base64.
_IMAGE_MAGIC = (
    b"\xff\xd8\xff",  # JPEG / MPO
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"II+\x00",  # BigTIFF
    b"MM\x00+",
)
#: Keys under which a request may carry the image (form field, JSON key, or TorchServe's "body").
PAYLOAD_KEYS = ("data", "body", "file", "image", "img", "b64")

SIZE = 28  # Fashion-MNIST images are 28x28, grayscale, light garment on black.

DEFAULTS = {
    "topk": 3,
    "intra_op_threads": None,  # None: max(1, os.cpu_count() // minWorkers)
    "max_image_pixels": 40_000_000,
    "min_image_side": 8,
    "invert": "auto",  # auto | always | never
}

FORM_HINT = (
    "the body arrived as application/x-www-form-urlencoded (e.g. curl --data-binary without -H), "
    "which TorchServe form-decodes and which corrupts binary data; send the image with "
    "-H 'Content-Type: application/octet-stream', curl -T FILE, curl -F data=@FILE, "
    "or as base64 (JSON {\"data\": \"<base64>\"} or --data-urlencode data@FILE.b64)"
)


class FashionMNISTHandler(BaseHandler):
    """Image classifier handler: any common image format -> Fashion-MNIST label."""

    class BadInput(Exception):
        """A client error for one request of a batch: HTTP code, short reason and message."""

        PHRASES = {
            400: "Bad Request",
            413: "Payload Too Large",
            415: "Unsupported Media Type",
            422: "Unprocessable Entity",
        }

        def __init__(self, code: int, reason: str, message: str):
            super().__init__(message)
            self.code = code
            self.reason = reason
            self.message = message

        @property
        def phrase(self) -> str:
            return self.PHRASES.get(self.code, "Bad Request")

        def body(self) -> dict:
            return {"error": self.message, "code": self.code, "reason": self.reason}

    def __init__(self):
        super().__init__()
        self.config = dict(DEFAULTS)
        self.labels: list[str] = []

    # ------------------------------------------------------------------ setup
    def initialize(self, context):
        """Load the state dict (width inferred from its shapes), the labels and the config."""
        self.context = context
        properties = context.system_properties
        model_dir = properties.get("model_dir")
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.config = self._read_config(yaml_config)

        threads = self.config["intra_op_threads"]
        if not threads:
            min_workers = yaml_config.get("minWorkers") or 1
            try:
                min_workers = max(1, int(min_workers))
            except (TypeError, ValueError):
                min_workers = 1
            threads = max(1, (os.cpu_count() or 1) // min_workers)
        self.config["intra_op_threads"] = int(threads)
        torch.set_num_threads(int(threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set (e.g. a second handler in the same process)
            pass
        Image.MAX_IMAGE_PIXELS = self.config["max_image_pixels"]

        self.device = torch.device("cpu")
        self.map_location = "cpu"
        manifest = getattr(context, "manifest", None) or {}
        model_meta = manifest.get("model", {})
        serialized = model_meta.get("serializedFile", "fashion_mnist_tinyvgg.pth")
        model_file = model_meta.get("modelFile", "model.py")
        self.model_pt_path = os.path.join(model_dir, serialized)
        self.model = self._build_model(model_dir, model_file, self.model_pt_path)

        labels_path = os.path.join(model_dir, "index_to_name.json")
        if not os.path.isfile(labels_path):
            raise RuntimeError(f"label file missing from the archive: {labels_path} (pass it with --extra-files)")
        with open(labels_path, encoding="utf-8") as f:
            mapping = json.load(f)
        n_out = self.model.classifier[-1].out_features
        missing = [i for i in range(n_out) if str(i) not in mapping]
        if missing:
            raise RuntimeError(f"{labels_path} has no label for class indices {missing}")
        self.mapping = mapping
        self.labels = [str(mapping[str(i)]) for i in range(n_out)]
        self.config["topk"] = max(1, min(int(self.config["topk"]), n_out))

        self.initialized = True
        logger.info(
            "fmnist handler ready: hidden_units=%d classes=%d threads=%d topk=%d max_image_pixels=%d",
            self.model.block_1[0].out_channels,
            n_out,
            threads,
            self.config["topk"],
            self.config["max_image_pixels"],
        )

    @staticmethod
    def _read_config(yaml_config: dict) -> dict:
        cfg = dict(DEFAULTS)
        section = yaml_config.get("handler") if isinstance(yaml_config, dict) else None
        if isinstance(section, dict):
            for key in DEFAULTS:
                if section.get(key) is not None:
                    cfg[key] = section[key]
        cfg["topk"] = int(cfg["topk"])
        cfg["max_image_pixels"] = int(cfg["max_image_pixels"])
        cfg["min_image_side"] = max(1, int(cfg["min_image_side"]))
        cfg["invert"] = str(cfg["invert"]).lower()
        if cfg["invert"] not in ("auto", "always", "never"):
            raise ValueError(f"handler.invert must be auto, always or never, not {cfg['invert']!r}")
        return cfg

    def _build_model(self, model_dir: str, model_file: str, weights_path: str) -> torch.nn.Module:
        """Import the single nn.Module of model.py and size it from the state dict's shapes."""
        module = importlib.import_module(os.path.splitext(os.path.basename(model_file))[0])
        classes = list_classes_from_module(module)
        if len(classes) != 1:
            raise RuntimeError(f"{model_file} must define exactly one class, found {classes}")
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        first = state["block_1.0.weight"]  # [hidden_units, input_shape, 3, 3]
        last = state["classifier.1.weight"]  # [output_shape, hidden_units * 7 * 7]
        model = classes[0](input_shape=first.shape[1], hidden_units=first.shape[0], output_shape=last.shape[0])
        model.load_state_dict(state, strict=True)
        return model.to(self.device).eval()

    # ------------------------------------------------------------------ request parsing
    @staticmethod
    def _content_type(context, idx: int) -> str:
        try:
            headers = context.get_all_request_header(idx) or {}
        except Exception:  # noqa: BLE001 - a fake or partial context
            return ""
        for key, value in headers.items():
            if str(key).lower() == "content-type" and isinstance(value, str):
                return value.lower()
        return ""

    def extract_payload(self, row, content_type: str = ""):
        """Return the image bytes of one request row, or raise BadInput."""
        form = content_type.startswith("application/x-www-form-urlencoded")
        if isinstance(row, dict):
            payload = None
            for key in PAYLOAD_KEYS:
                if row.get(key) not in (None, b"", ""):
                    payload = row[key]
                    break
            if payload is None:
                if form and row:
                    # TorchServe split a raw body at '&' and '=' into "fields": glue them back.
                    payload = "&".join(
                        f"{k}={v.decode('utf-8', 'replace') if isinstance(v, (bytes, bytearray)) else v}"
                        for k, v in row.items()
                    )
                else:
                    payload = next(
                        (v for v in row.values() if isinstance(v, (bytes, bytearray, str, dict)) and v), None
                    )
        else:
            payload = row
        if payload is None or (isinstance(payload, (bytes, bytearray, str)) and len(payload) == 0):
            if form:
                raise self.BadInput(415, "form_urlencoded", "no usable data: " + FORM_HINT)
            raise self.BadInput(400, "empty_body", "empty request: send the image bytes in the body")
        return self._to_image_bytes(payload, form)

    def _to_image_bytes(self, payload, form: bool) -> bytes:
        if isinstance(payload, dict):  # JSON body, already decoded by TorchServe
            for key in PAYLOAD_KEYS:
                if isinstance(payload.get(key), str) and payload[key]:
                    return self._b64decode(payload[key], form)
            raise self.BadInput(400, "bad_json", 'JSON body must look like {"data": "<base64 image>"}')
        if isinstance(payload, list):
            raise self.BadInput(400, "bad_json", 'JSON body must look like {"data": "<base64 image>"}')
        if isinstance(payload, str):
            try:
                return self._b64decode(payload, form)
            except self.BadInput:
                if form:
                    raise self.BadInput(415, "form_urlencoded", "the body is not a decodable image: " + FORM_HINT)
                raise
        data = bytes(payload)
        if data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            return data
        # Not a known image signature: maybe base64 text or a JSON document sent as bytes.
        head = data[:64].lstrip()
        if head[:1] in (b"{", b'"'):
            try:
                return self._to_image_bytes(json.loads(data.decode("utf-8")), form)
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            if form:
                raise self.BadInput(415, "form_urlencoded", "the body is not a decodable image: " + FORM_HINT)
            return data  # let Pillow tell what it is (not an image, truncated, ...)
        key = text[:16].split("=", 1)[0].strip() if "=" in text[:16] else ""
        if key in PAYLOAD_KEYS:
            # A form body ("data=<base64>") that a proxy relabelled as octet-stream
            # (the shipped nginx site does, so that binary --data-binary survives).
            fields = urllib.parse.parse_qs(text, keep_blank_values=True)
            if fields.get(key) and fields[key][0]:
                return self._b64decode(fields[key][0], form=True)
        try:
            return self._b64decode(text, form, strict=True)
        except self.BadInput:
            if form:
                raise self.BadInput(415, "form_urlencoded", "the body is not a decodable image: " + FORM_HINT)
            raise self.BadInput(415, "not_an_image", "the body is neither an image nor base64 of an image")

    def _b64decode(self, text: str, form: bool, strict: bool = False) -> bytes:
        text = text.strip()
        if text.startswith("data:") and "," in text[:100]:  # data URL: data:image/png;base64,....
            text = text.split(",", 1)[1]
        if form:  # form decoding turned every '+' of the base64 text into a space
            text = text.replace(" ", "+")
        text = "".join(text.split()).rstrip("=")
        text += "=" * (-len(text) % 4)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            if strict:
                raise self.BadInput(415, "not_an_image", "the body is neither an image nor valid base64")
            raise self.BadInput(400, "bad_base64", "the base64 text does not decode")
        if not data:
            raise self.BadInput(400, "empty_body", "the base64 text is empty")
        return data

    # ------------------------------------------------------------------ decoding and preprocessing
    def decode_image(self, data: bytes) -> Image.Image:
        """Bytes -> Pillow image (first frame), with size limits checked before decoding pixels."""
        max_pixels = self.config["max_image_pixels"]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as e:
            raise self.BadInput(413, "image_too_large", f"image too large: {e}")
        except Image.UnidentifiedImageError:
            raise self.BadInput(
                415, "not_an_image", f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
            )
        except Exception as e:  # noqa: BLE001 - broken headers raise all sorts of errors
            raise self.BadInput(400, "corrupt_image", f"corrupt image header: {type(e).__name__}: {e}")
        width, height = img.size
        if width * height > max_pixels:
            raise self.BadInput(
                413,
                "image_too_large",
                f"image too large: {width}x{height} = {width * height} pixels, the limit is {max_pixels}",
            )
        min_side = self.config["min_image_side"]
        if min(width, height) < min_side:
            raise self.BadInput(
                422, "image_too_small", f"image too small: {width}x{height}, each side must be >= {min_side} pixels"
            )
        try:
            if img.format in ("JPEG", "MPO") and min(width, height) > 512:
                img.draft(img.mode, (256, 256))  # decode a downscaled JPEG directly (DCT scaling): fast
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
        except Exception as e:  # noqa: BLE001 - truncated data: OSError, SyntaxError, zlib errors...
            raise self.BadInput(400, "corrupt_image", f"corrupt or truncated image: {type(e).__name__}: {e}")
        return img

    @staticmethod
    def to_grayscale(img: Image.Image) -> Image.Image:
        """EXIF orientation, alpha on white, 16-bit scaling, then 8-bit grayscale ('L')."""
        img = ImageOps.exif_transpose(img)
        mode = img.mode
        if mode.startswith("I;16"):
            return img.convert("I").point(lambda v: v / 257.0).convert("L")
        if mode in ("I", "F"):
            lo, hi = img.getextrema()
            if mode == "F" and hi <= 1.0 and lo >= 0.0:
                scale = 255.0
            elif hi > 255:
                scale = 255.0 / (65535.0 if hi <= 65535 else float(hi))
            else:
                scale = 1.0
            img = img.point(lambda v: v * scale)
            return img.convert("L") if mode == "I" else img.convert("I").convert("L")
        has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
        if has_alpha:
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            img = canvas
        return img.convert("L")

    @staticmethod
    def border_level(img: Image.Image) -> int:
        """Median of the pixels of the outer frame (about 4% of the shorter side wide)."""
        width, height = img.size
        ring = max(1, round(min(width, height) * 0.04))
        hist = [0] * 256
        for box in (
            (0, 0, width, ring),
            (0, height - ring, width, height),
            (0, ring, ring, height - ring),
            (width - ring, ring, width, height - ring),
        ):
            if box[2] > box[0] and box[3] > box[1]:
                for i, n in enumerate(img.crop(box).histogram()):
                    hist[i] += n
        half, acc = sum(hist) / 2.0, 0
        for value, n in enumerate(hist):
            acc += n
            if acc >= half:
                return value
        return 0

    def to_model_image(self, gray: Image.Image) -> Image.Image:
        """Grayscale image -> 28x28 'L' image in Fashion-MNIST style (light garment on black)."""
        mode = self.config["invert"]
        bg = self.border_level(gray)
        invert = mode == "always" or (mode == "auto" and bg > 127)
        if gray.size == (SIZE, SIZE) and not invert:
            return gray  # dataset-style image: used as is
        if invert:
            gray = ImageOps.invert(gray)
            bg = 255 - bg
        # Background to black, contrast stretched to the full range (robust to outliers).
        hist = gray.histogram()
        total, acc, hi = sum(hist), 0, 255
        for value in range(255, -1, -1):
            acc += hist[value]
            if acc > total * 0.002:
                hi = value
                break
        if hi > bg:
            scale = 255.0 / (hi - bg)
            gray = gray.point([min(255, max(0, round((v - bg) * scale))) for v in range(256)])
        # Trim to the object (pixels clearly above the background), keep the aspect ratio.
        bbox = gray.point([255 if v > 40 else 0 for v in range(256)]).getbbox()
        if bbox:
            gray = gray.crop(bbox)
        width, height = gray.size
        scale = SIZE / max(width, height)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        gray = gray.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        canvas = Image.new("L", (SIZE, SIZE), 0)
        canvas.paste(gray, ((SIZE - new_size[0]) // 2, (SIZE - new_size[1]) // 2))
        return canvas

    @staticmethod
    def to_tensor(img: Image.Image) -> torch.Tensor:
        """28x28 'L' image -> float tensor [1, 28, 28] in [0, 1] (what ToTensor() gives)."""
        raw = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return raw.reshape(1, SIZE, SIZE).float().div_(255.0)

    def image_to_tensor(self, data: bytes) -> torch.Tensor:
        return self.to_tensor(self.to_model_image(self.to_grayscale(self.decode_image(data))))

    # ------------------------------------------------------------------ TorchServe entry points
    def preprocess(self, data):
        """List of request rows -> list of tensors [1,28,28] or BadInput, one per row."""
        items = []
        for idx, row in enumerate(data):
            try:
                payload = self.extract_payload(row, self._content_type(self.context, idx))
                items.append(self.image_to_tensor(payload))
            except self.BadInput as e:
                items.append(e)
            except Exception as e:  # noqa: BLE001 - never let one request fail the batch
                logger.exception("request %d of the batch: unexpected preprocessing error", idx)
                items.append(self.BadInput(400, "bad_input", f"could not process the input: {type(e).__name__}"))
        return items

    def inference(self, data, *args, **kwargs):
        """[N,1,28,28] -> class probabilities [N, classes], one forward pass."""
        with torch.inference_mode():
            return torch.softmax(self.model(data.to(self.device)), dim=1).cpu()

    def postprocess(self, data):
        k = self.config["topk"]
        out = []
        for probs in data:
            top_p, top_i = probs.topk(k)
            best = int(top_i[0])
            out.append(
                {
                    "label": self.labels[best],
                    "index": best,
                    "probabilities": {self.labels[int(i)]: round(float(p), 6) for p, i in zip(top_p, top_i)},
                }
            )
        return out

    def handle(self, data, context):
        """Entry point: one call per batch; returns one JSON-able dict per request, in order."""
        self.context = context
        start = time.perf_counter()
        items = self.preprocess(data)
        good = [i for i, item in enumerate(items) if isinstance(item, torch.Tensor)]
        results = [None] * len(items)
        infer_ms = 0.0
        if good:
            t0 = time.perf_counter()
            probs = self.inference(torch.stack([items[i] for i in good]))
            infer_ms = (time.perf_counter() - t0) * 1000
            for i, res in zip(good, self.postprocess(probs)):
                results[i] = res
        for idx, item in enumerate(items):
            if isinstance(item, self.BadInput):
                results[idx] = item.body()
                self._set_status(context, idx, item.code, item.phrase)
            self._set_json(context, idx)
        logger.info(
            "fmnist batch size=%d ok=%d errors=%d forward_ms=%.2f total_ms=%.2f",
            len(items),
            len(good),
            len(items) - len(good),
            infer_ms,
            (time.perf_counter() - start) * 1000,
        )
        return results

    @staticmethod
    def _set_status(context, idx: int, code: int, phrase: str) -> None:
        try:
            context.set_response_status(code, phrase, idx)
        except Exception:  # noqa: BLE001 - a context without request processors (tests, tools)
            logger.debug("could not set the status of request %d", idx, exc_info=True)

    @staticmethod
    def _set_json(context, idx: int) -> None:
        try:
            context.set_response_content_type(idx, "application/json")
        except Exception:  # noqa: BLE001
            logger.debug("could not set the content type of request %d", idx, exc_info=True)

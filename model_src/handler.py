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

Hostile input: every body is classified before anything is allocated from it
(only bytes, a string or a small JSON object with a string image field go on),
the client never supplies a size, and a decoded image is shrunk before any
other step, so that the memory one request costs is bounded (README: "Limits").
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import importlib
import io
import json
import logging
import os
import time
import warnings

import torch
from PIL import Image, ImageOps, PngImagePlugin
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import list_classes_from_module

logger = logging.getLogger(__name__)
Image.init()  # register every Pillow plugin, so that Image.open(formats=...) knows them all

#: Formats a phone or a browser uploads. Pillow may use only these decoders (the JPEG opener
#: also returns MPO, what many phones write); TIFF, ICO, PSD, ... are refused on purpose.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
FORMAT_NAMES = "JPEG, PNG, GIF, WebP or BMP"
#: Magic numbers of those formats: bytes starting so are decoded as an image, not as base64.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
#: Keys under which a request may carry the image (form field, JSON key, or TorchServe's "body").
PAYLOAD_KEYS = ("data", "body", "file", "image", "img", "b64")
#: An upload is one image: more form fields or multipart parts than this in one request
#: are refused before any of them is looked at.
MAX_FIELDS = 8
#: A JSON body is {"data": "<base64>"}: at most this many of each of { [ : , before parsing.
MAX_JSON_TOKENS = 16
#: Decoded images are shrunk at once (JPEG: while decoding) so that the shorter side is at
#: least this (and less than twice it): every later step works on a small image.
WORK_SIDE = 256
_WHITESPACE = b" \t\r\n\x0b\x0c"
_FORM_ESCAPES = ((b"%2B", b"+"), (b"%2F", b"/"), (b"%3D", b"="), (b"%0A", b"\n"), (b"%0D", b"\r"), (b"%20", b" "))

# Text chunks are never used: keep what a PNG can make Pillow hold for them small.
PngImagePlugin.MAX_TEXT_CHUNK = 64 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 256 * 1024

SIZE = 28  # Fashion-MNIST images are 28x28, grayscale, light garment on black.

DEFAULTS = {
    "topk": 3,
    "intra_op_threads": None,  # None: max(1, os.cpu_count() // minWorkers)
    "max_image_pixels": 40_000_000,
    "max_image_memory_mb": 64,
    "min_image_side": 8,
    "invert": "auto",  # auto | always | never
}

FORM_HINT = (
    "The body arrived as application/x-www-form-urlencoded (e.g. curl --data-binary without -H), "
    "which TorchServe form-decodes and which corrupts binary data; send the image with "
    "-H 'Content-Type: application/octet-stream', curl -T FILE, curl -F data=@FILE, "
    "or as base64 (JSON {\"data\": \"<base64>\"} or --data-urlencode data@FILE.b64)."
)

#: The only texts a client sees: fixed sentences (limits filled in from our own config).
MESSAGES = {
    "empty_body": (400, "The request has no image: send the image bytes as the body."),
    "bad_json": (400, 'The JSON body must be an object with the base64 image as a string under "data", "image" or "b64".'),
    "bad_base64": (400, "The base64 text does not decode."),
    "corrupt_image": (400, "The image is truncated or corrupt."),
    "too_many_fields": (400, f"The request has more than {MAX_FIELDS} form fields or parts: send one image."),
    "bad_input": (400, "The request could not be processed."),
    "image_too_large": (
        413,
        "The image is too large: at most {max_image_pixels} pixels (width x height) are accepted in this format.",
    ),
    "not_an_image": (415, f"The body is not an image in a supported format ({FORMAT_NAMES}), nor base64 of one."),
    "form_urlencoded": (415, FORM_HINT),
    "image_too_small": (422, "The image is too small: each side must be at least {min_image_side} pixels."),
}


def _return_big_buffers_to_the_system() -> None:
    """glibc serves big allocations from the heap once one was freed (its mmap threshold moves up
    to 32 MB), and a heap seldom shrinks: after a few multi-MB bodies or images the worker kept
    them. Fixed at 1 MB, every buffer that big is its own mapping and is returned when freed."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _one_line(exc: BaseException) -> str:
    """An exception as one short log line: type, message, and where it was raised."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}" if tb else ""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}{where}"


class FashionMNISTHandler(BaseHandler):
    """Image classifier handler: any common image format -> Fashion-MNIST label."""

    class BadInput(Exception):
        """A client error for one request of a batch: its reason (a MESSAGES key) and, for the
        log only, what exactly went wrong."""

        PHRASES = {
            400: "Bad Request",
            413: "Payload Too Large",
            415: "Unsupported Media Type",
            422: "Unprocessable Entity",
        }

        def __init__(self, reason: str, detail: str = "", **limits):
            code, message = MESSAGES[reason]
            super().__init__(reason)
            self.code = code
            self.reason = reason
            self.message = message.format(**limits) if limits else message
            self.detail = detail

        @property
        def phrase(self) -> str:
            return self.PHRASES.get(self.code, "Bad Request")

        def body(self) -> dict:
            return {"error": self.message, "code": self.code, "reason": self.reason}

        def log_text(self) -> str:
            return f"{self.code} {self.reason}" + (f" ({self.detail})" if self.detail else "")

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
        _return_big_buffers_to_the_system()
        # The worker json.loads()es application/json and decodes text/* bodies before the handler
        # runs (any JSON, any depth; a traceback per failure). This worker serves only this
        # model: hand every body over as bytes and classify it here (read per request).
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"

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
        cfg["max_image_memory_mb"] = int(cfg["max_image_memory_mb"])
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
        # The header map also holds an entry per multipart part: look the usual spellings up first.
        for key in ("Content-Type", "content-type"):
            if isinstance(headers.get(key), str):
                return headers[key].lower()
        for key, value in headers.items():
            if str(key).lower() == "content-type" and isinstance(value, str):
                return value.lower()
        return ""

    def extract_payload(self, row, content_type: str = "") -> bytes:
        """Return the image bytes of one request row, or raise BadInput.

        A row is what TorchServe made of one request: {field or part name: value}. Only the
        types checked here go on; nothing the client sent is used as a size or a count."""
        form = content_type.startswith("application/x-www-form-urlencoded")
        json_type = content_type.startswith("application/json")
        if isinstance(row, dict):
            if len(row) > MAX_FIELDS:  # a binary body sent as a form is split into many fields too
                raise self.BadInput("form_urlencoded" if form else "too_many_fields", f"{len(row)} fields")
            payload = None
            for key in PAYLOAD_KEYS:
                if row.get(key) not in (None, b"", ""):
                    payload = row[key]
                    break
            if payload is None and row:
                if form:
                    # TorchServe split a raw body at '&' and '=' into "fields": glue them back.
                    payload = b"&".join(
                        self._text_bytes(k) + b"=" + self._text_bytes(v)
                        for k, v in row.items()
                        if isinstance(k, str) and isinstance(v, (bytes, bytearray, str))
                    )
                else:
                    payload = next((v for v in row.values() if v not in (None, b"", "")), None)
        else:
            payload = row
        if payload is None or (isinstance(payload, (bytes, bytearray, str)) and len(payload) == 0):
            if form:
                raise self.BadInput("form_urlencoded", "no usable field")
            raise self.BadInput("empty_body")
        if isinstance(payload, dict):  # JSON the worker decoded itself (decoding left on)
            return self._from_json_object(payload, form)
        if isinstance(payload, str):  # text the worker decoded (already parsed, if it was JSON)
            try:
                return self._from_bytes(payload.encode("ascii"), form, json_type=False)
            except UnicodeEncodeError:
                raise self.BadInput("form_urlencoded" if form else "not_an_image", "non-ASCII text")
        if not isinstance(payload, (bytes, bytearray)):
            # A number, null, a boolean or a list, decoded by the worker: never used as anything.
            raise self.BadInput("bad_json", f"JSON {type(payload).__name__}")
        return self._from_bytes(payload, form, json_type)  # a bytearray as the worker read it: no copy

    @staticmethod
    def _text_bytes(value) -> bytes:
        if isinstance(value, str):
            return value.encode("utf-8", "replace")
        return bytes(value)

    def _from_json_object(self, obj: dict, form: bool) -> bytes:
        for key in PAYLOAD_KEYS:
            value = obj.get(key)
            if value == "":
                raise self.BadInput("empty_body", "empty JSON string")
            if isinstance(value, str) and value:
                try:
                    return self._b64decode(value.encode("ascii"), form)
                except UnicodeEncodeError:
                    raise self.BadInput("bad_base64", "non-ASCII text")
        raise self.BadInput("bad_json", "no image string in the object")

    def _parse_json(self, data: bytes, form: bool) -> bytes:
        """A JSON body: a string, or an object with a few keys. Refused by its shape before parsing,
        so that no document becomes a big or deep structure in memory."""
        first = data[:64].lstrip(_WHITESPACE)[:1]
        if first == b'"':
            try:
                text = json.loads(data)
            except (ValueError, RecursionError) as e:
                raise self.BadInput("bad_json", _one_line(e))
            if not isinstance(text, str) or not text:
                raise self.BadInput("empty_body" if text == "" else "bad_json", "JSON string")
            return self._from_json_object({"data": text}, form)
        if first != b"{":
            raise self.BadInput("bad_json", f"JSON starting with {first!r}")
        for token in (b"{", b"[", b":", b","):
            if data.count(token) > MAX_JSON_TOKENS:
                raise self.BadInput("bad_json", f"more than {MAX_JSON_TOKENS} {token.decode()!r}")
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as e:  # also UnicodeDecodeError, too many digits
            raise self.BadInput("bad_json", _one_line(e))
        if not isinstance(obj, dict):
            raise self.BadInput("bad_json", type(obj).__name__)
        return self._from_json_object(obj, form)

    def _from_bytes(self, data: bytes, form: bool, json_type: bool) -> bytes:
        if data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            return data
        head = data[:64].lstrip(_WHITESPACE)
        if json_type or head[:1] in (b"{", b'"'):
            return self._parse_json(data, form)
        if not data.isascii():
            if form:
                raise self.BadInput("form_urlencoded", "binary body")
            return data  # let Pillow tell what it is (not an image, truncated, ...)
        key = head[:16].split(b"=", 1)[0].strip().decode() if b"=" in head[:16] else ""
        if key in PAYLOAD_KEYS:
            # A form body ("data=<base64>") that a proxy relabelled as octet-stream
            # (the shipped nginx site does, so that binary --data-binary survives).
            if data.count(b"&") >= MAX_FIELDS:
                raise self.BadInput("too_many_fields", "form body")
            for field in data.split(b"&"):
                name, _, value = field.partition(b"=")
                if name.strip().decode() == key:
                    if not value.strip(_WHITESPACE):
                        raise self.BadInput("empty_body", "empty form field")
                    return self._b64decode(value, form=True, quoted=True)
        try:
            return self._b64decode(data, form, strict=True)
        except self.BadInput as e:
            if form:
                raise self.BadInput("form_urlencoded", e.detail)
            raise

    def _b64decode(self, text: bytes, form: bool, strict: bool = False, quoted: bool = False) -> bytes:
        """ASCII base64 (or a data: URL, or a form-encoded value) -> bytes; all steps are linear in
        the length and make no more than two copies of it."""
        text = text.strip(_WHITESPACE)
        if text.startswith(b"data:") and b"," in text[:100]:  # data URL: data:image/png;base64,....
            text = text.split(b",", 1)[1]
        if quoted and b"%" in text:  # the escapes urlencoding makes of base64 text, nothing else
            for escape, char in _FORM_ESCAPES:
                text = text.replace(escape, char).replace(escape.lower(), char)
        if form or quoted:  # form decoding turned every '+' of the base64 text into a space
            text = text.replace(b" ", b"+")
        text = text.translate(None, _WHITESPACE).rstrip(b"=")
        text += b"=" * (-len(text) % 4)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise self.BadInput("not_an_image" if strict else "bad_base64", _one_line(e))
        if not data:
            raise self.BadInput("empty_body", "empty base64")
        return data

    # ------------------------------------------------------------------ decoding and preprocessing
    def decode_image(self, data: bytes) -> Image.Image:
        """Bytes -> small Pillow image (first frame). The size is checked from the header before
        any pixel is decoded; JPEGs are decoded at reduced scale; anything else is shrunk right
        after decoding, before the EXIF rotation and the colour conversion."""
        max_pixels = self.config["max_image_pixels"]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as e:
            raise self.BadInput("image_too_large", _one_line(e), max_image_pixels=max_pixels)
        except Image.UnidentifiedImageError as e:
            raise self.BadInput("not_an_image", _one_line(e))
        except Exception as e:  # noqa: BLE001 - broken headers raise all sorts of errors
            raise self.BadInput("corrupt_image", _one_line(e))
        width, height = img.size
        limit = self.pixel_limit(img)
        if width * height > limit:
            raise self.BadInput("image_too_large", f"{img.format} {img.mode} {width}x{height}", max_image_pixels=limit)
        min_side = self.config["min_image_side"]
        if min(width, height) < min_side:
            raise self.BadInput("image_too_small", f"{width}x{height}", min_image_side=min_side)
        try:
            if img.format in ("JPEG", "MPO"):
                # DCT scaling (down to 1/8) and, for colour JPEGs, only the luma is decoded.
                img.draft("L", (WORK_SIDE, WORK_SIDE))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
            return self.shrink(img)
        except Exception as e:  # noqa: BLE001 - truncated data: OSError, SyntaxError, zlib errors...
            raise self.BadInput("corrupt_image", _one_line(e))

    def pixel_limit(self, img: Image.Image) -> int:
        """The most pixels an opened (not yet decoded) image may have: max_image_pixels, and no
        more than fit into max_image_memory_mb at what decoding this format and mode costs."""
        budget = self.config["max_image_memory_mb"] * 2**20
        return min(self.config["max_image_pixels"], int(budget / self.bytes_per_pixel(img)))

    @staticmethod
    def bytes_per_pixel(img: Image.Image) -> float:
        """Peak worker memory per pixel of decoding an image and shrinking it (measured; README)."""
        if img.format in ("JPEG", "MPO"):
            # libjpeg holds every DCT coefficient (2 bytes) of the whole image when it has more than
            # one scan (progressive, or one scan per component); a header does not tell which, so
            # count it always. Per component, its share of the luma resolution.
            layers = getattr(img, "layer", None) or [(0, 1, 1, 0)] * 4
            h_max = max(h for _, h, _, _ in layers)
            v_max = max(v for _, _, v, _ in layers)
            return 0.25 + 2.0 * sum(h * v for _, h, v, _ in layers) / (h_max * v_max)
        if img.format == "WEBP":
            return 16.0  # libwebp's RGBA canvas and frame, Pillow's copy, the image
        if img.mode in ("1", "L", "P"):
            return 2.0  # the decoded image and its grayscale copy
        if img.mode.startswith("I;16"):
            return 2.5
        return 4.5  # RGB, RGBA, LA, CMYK, I, F: four bytes per pixel and a few strips

    @staticmethod
    def shrink(img: Image.Image) -> Image.Image:
        """Reduce a decoded image (box filter) so that its shorter side is < 2 x WORK_SIDE, in a
        mode of at most the decoded image's bytes per pixel; palette images become grayscale
        (transparent entries composited on white) without being expanded to RGBA."""
        if img.mode == "P":
            img = FashionMNISTHandler._palette_to_gray(img)
        elif img.mode == "1":
            img = img.convert("L")
        factor = min(img.size) // WORK_SIDE
        if factor < 2:
            return img
        size = (img.width // factor, img.height // factor)
        if img.mode.startswith("I;16") or img.mode == "PA":
            return img.resize(size, Image.Resampling.BOX)
        if img.mode not in ("LA", "RGBA"):
            return img.reduce(factor)
        # reduce() of a mode with alpha premultiplies a copy of the whole image: go by strips.
        out = Image.new(img.mode, size)
        rows = factor * max(1, (4 * 2**20) // (img.width * 4 * factor * factor) * factor or 1)
        for top in range(0, size[1] * factor, rows):
            strip = img.crop((0, top, size[0] * factor, min(top + rows, size[1] * factor)))
            out.paste(strip.reduce(factor), (0, top // factor))
        return out

    @staticmethod
    def _palette_to_gray(img: Image.Image) -> Image.Image:
        palette = img.getpalette("RGBA") or []
        alpha = palette[3::4]
        transparency = img.info.get("transparency")
        if isinstance(transparency, int) and transparency < len(alpha):
            alpha[transparency] = 0
        elif isinstance(transparency, (bytes, bytearray)):
            alpha[: len(transparency)] = list(transparency)[: len(alpha)]
        lut = []
        for i, a in enumerate(alpha):
            r, g, b = palette[4 * i : 4 * i + 3]
            gray = (r * 299 + g * 587 + b * 114) / 1000  # what convert("L") computes
            lut.append(round(gray * a / 255 + 255 * (1 - a / 255)))
        lut += [0] * (256 - len(lut))
        gray_img = img.point(lut[:256], "L")
        gray_img.info.pop("transparency", None)
        return gray_img

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
                items.append(self.BadInput("bad_input", "unexpected " + _one_line(e)))
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
        # One line per batch, whatever the batch held: the bad requests' details go into it.
        bad = "; ".join(f"#{i} {item.log_text()}" for i, item in enumerate(items) if isinstance(item, self.BadInput))
        logger.info(
            "fmnist batch size=%d ok=%d errors=%d forward_ms=%.2f total_ms=%.2f%s",
            len(items),
            len(good),
            len(items) - len(good),
            infer_ms,
            (time.perf_counter() - start) * 1000,
            f" bad: {bad}" if bad else "",
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

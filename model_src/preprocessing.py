"""Image preprocessing of the Fashion-MNIST handler: image bytes -> [1, 28, 28] float tensor
(model_src/README.md, "Preprocessing" and "Limits").

The seam for other code (benchmarks, tools): `image_to_tensor(data, **options)`, or a
`Preprocessor(**options)` kept around for many images. Options and their defaults: OPTIONS.
Bad images raise errors.BadInput (status, reason and a fixed message for the client).

Memory: the size is checked from the header before any pixel is decoded (the pixel limit of a
format follows what decoding it costs), and a decoded image is shrunk before any other step.
"""

from __future__ import annotations

import functools
import io
import warnings
from bisect import bisect_left
from itertools import accumulate

import torch
from errors import BadInput, one_line
from PIL import Image, ImageOps, PngImagePlugin

Image.init()  # register every Pillow plugin, so that Image.open(formats=...) knows them all

#: Formats a phone or a browser uploads. Pillow may use only these decoders (the JPEG opener
#: also returns MPO, what many phones write); TIFF, ICO, PSD, ... are refused on purpose.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
#: Decoded images are shrunk at once (JPEG: while decoding) so that the shorter side is at
#: least this (and less than twice it): every later step works on a small image. 128 px is
#: still > 4x the 28 px the garment ends up at: on photos the labels are the same as from a
#: full-size decode (tests/model, test_reduced_decoding_keeps_the_labels), at 0.7x the cost
#: of 256 px.
WORK_SIDE = 128
SIZE = 28  # Fashion-MNIST images are 28x28, grayscale, light garment on black.

#: The handler_config keys this module reads, with their defaults.
OPTIONS = {
    "max_image_pixels": 40_000_000,
    "max_image_memory_mb": 64,
    "min_image_side": 8,
    "invert": "auto",  # auto | always | never
}

# Text chunks are never used: keep what a PNG can make Pillow hold for them small.
PngImagePlugin.MAX_TEXT_CHUNK = 64 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 256 * 1024


def image_to_tensor(data: bytes, **options) -> torch.Tensor:
    """Image bytes (JPEG, PNG, GIF, WebP, BMP) -> float tensor [1, 28, 28] in [0, 1], light
    garment on black; raises BadInput. Options: see OPTIONS."""
    return Preprocessor(**options).image_to_tensor(data)


class Preprocessor:
    """The preprocessing steps bound to one set of options (limits, inversion)."""

    def __init__(self, **options):
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise TypeError(f"unknown preprocessing options: {sorted(unknown)}")
        self.options = {**OPTIONS, **options}
        self.options["max_image_pixels"] = int(self.options["max_image_pixels"])
        self.options["max_image_memory_mb"] = int(self.options["max_image_memory_mb"])
        self.options["min_image_side"] = max(1, int(self.options["min_image_side"]))
        self.options["invert"] = str(self.options["invert"]).lower()
        if self.options["invert"] not in ("auto", "always", "never"):
            raise ValueError(f"handler.invert must be auto, always or never, not {self.options['invert']!r}")

    def image_to_tensor(self, data: bytes) -> torch.Tensor:
        return to_tensor(self.to_model_image(to_grayscale(self.decode_image(data))))

    def decode_image(self, data: bytes) -> Image.Image:
        """Bytes -> small Pillow image (first frame). The size is checked from the header before
        any pixel is decoded; JPEGs are decoded at reduced scale; anything else is shrunk right
        after decoding, before the EXIF rotation and the colour conversion."""
        max_pixels = self.options["max_image_pixels"]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as e:
            raise BadInput("image_too_large", one_line(e), max_image_pixels=max_pixels)
        except Image.UnidentifiedImageError as e:
            raise BadInput("not_an_image", one_line(e))
        except Exception as e:  # noqa: BLE001 - broken headers raise all sorts of errors
            raise BadInput("corrupt_image", one_line(e))
        width, height = img.size
        limit = self.pixel_limit(img)
        if width * height > limit:
            raise BadInput("image_too_large", f"{img.format} {img.mode} {width}x{height}", max_image_pixels=limit)
        min_side = self.options["min_image_side"]
        if min(width, height) < min_side:
            raise BadInput("image_too_small", f"{width}x{height}", min_image_side=min_side)
        try:
            if img.format in ("JPEG", "MPO"):
                # DCT scaling (down to 1/8) and, for colour JPEGs, only the luma is decoded.
                img.draft("L", (WORK_SIDE, WORK_SIDE))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
            return shrink(img)
        except Exception as e:  # noqa: BLE001 - truncated data: OSError, SyntaxError, zlib errors...
            raise BadInput("corrupt_image", one_line(e))

    def pixel_limit(self, img: Image.Image) -> int:
        """The most pixels an opened (not yet decoded) image may have: max_image_pixels, and no
        more than fit into max_image_memory_mb at what decoding this format and mode costs."""
        budget = self.options["max_image_memory_mb"] * 2**20
        return min(self.options["max_image_pixels"], int(budget / bytes_per_pixel(img)))

    def to_model_image(self, gray: Image.Image) -> Image.Image:
        """Grayscale image -> 28x28 'L' image in Fashion-MNIST style (light garment on black)."""
        mode = self.options["invert"]
        bg = border_level(gray)
        invert = mode == "always" or (mode == "auto" and bg > 127)
        if gray.size == (SIZE, SIZE) and not invert:
            return gray  # dataset-style image: used as is
        hist = gray.histogram()
        if invert:  # the histogram of the inverted image; the inversion is part of the LUT below
            hist.reverse()
            bg = 255 - bg
        # Background to black, contrast stretched to the full range (robust to outliers).
        total, acc, hi = sum(hist), 0, 255
        for value in range(255, -1, -1):
            acc += hist[value]
            if acc > total * 0.002:
                hi = value
                break
        if invert or hi > bg:
            gray = gray.point(_levels_lut(bg, hi, invert))  # one pass: inversion and stretch
        # Trim to the object (pixels clearly above the background), keep the aspect ratio.
        bbox = gray.point(_OBJECT_LUT).getbbox()
        if bbox:
            gray = gray.crop(bbox)
        width, height = gray.size
        scale = SIZE / max(width, height)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        gray = gray.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        canvas = Image.new("L", (SIZE, SIZE), 0)
        canvas.paste(gray, ((SIZE - new_size[0]) // 2, (SIZE - new_size[1]) // 2))
        return canvas



#: Pixels clearly above the (black) background belong to the object.
_OBJECT_LUT = tuple(255 if v > 40 else 0 for v in range(256))


@functools.lru_cache(maxsize=4096)
def _levels_lut(bg: int, hi: int, invert: bool) -> tuple[int, ...]:
    """Pixel map: inverted (if asked), then background level bg to 0 and hi to 255 (if hi > bg)."""
    lut = list(range(255, -1, -1)) if invert else list(range(256))
    if hi > bg:
        scale = 255.0 / (hi - bg)
        lut = [min(255, max(0, round((v - bg) * scale))) for v in lut]
    return tuple(lut)


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


def shrink(img: Image.Image) -> Image.Image:
    """Reduce a decoded image (box filter) so that its shorter side is < 2 x WORK_SIDE, in a
    mode of at most the decoded image's bytes per pixel; palette images become grayscale
    (transparent entries composited on white) without being expanded to RGBA."""
    if img.mode == "P":
        img = _palette_to_gray(img)
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


def border_level(img: Image.Image) -> int:
    """Median of the pixels of the outer frame (about 4% of the shorter side wide)."""
    width, height = img.size
    ring = max(1, round(min(width, height) * 0.04))
    boxes = (
        (0, 0, width, ring),
        (0, height - ring, width, height),
        (0, ring, ring, height - ring),
        (width - ring, ring, width, height - ring),
    )
    hists = [img.crop(box).histogram() for box in boxes if box[2] > box[0] and box[3] > box[1]]
    cumulative = list(accumulate(map(sum, zip(*hists))))
    if not cumulative or not cumulative[-1]:
        return 0
    return bisect_left(cumulative, cumulative[-1] / 2.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """28x28 'L' image -> float tensor [1, 28, 28] in [0, 1] (what ToTensor() gives)."""
    raw = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return raw.reshape(1, SIZE, SIZE).float().div_(255.0)

"""The client errors of the Fashion-MNIST handler: one exception class and the fixed sentences a
client sees (see model_src/README.md, "Errors"). Shared by decoding.py and preprocessing.py."""

from __future__ import annotations

import os

#: An upload is one image: more form fields or multipart parts than this in one request
#: are refused before any of them is looked at.
MAX_FIELDS = 8
FORMAT_NAMES = "JPEG, PNG, GIF, WebP or BMP"

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
    "explanation_failed": (500, "The explanation could not be computed."),
}


class BadInput(Exception):
    """A client error for one request of a batch: its reason (a MESSAGES key) and, for the
    log only, what exactly went wrong."""

    PHRASES = {
        400: "Bad Request",
        413: "Payload Too Large",
        415: "Unsupported Media Type",
        422: "Unprocessable Entity",
        500: "Internal Server Error",
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


def one_line(exc: BaseException) -> str:
    """An exception as one short log line: type, message, and where it was raised."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}" if tb else ""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}{where}"

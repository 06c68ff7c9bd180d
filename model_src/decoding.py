"""Request-body decoding of the Fashion-MNIST handler: one TorchServe request row -> the image
bytes (model_src/README.md, "Inputs accepted").

Every body is classified before anything is allocated from it: only bytes, a string or a small
JSON object with a string image field go on, and the client never supplies a size or a count.
Bad bodies raise errors.BadInput.
"""

from __future__ import annotations

import base64
import binascii
import json

from errors import MAX_FIELDS, BadInput, one_line

#: Magic numbers of the accepted formats: bytes starting so are decoded as an image, not as base64.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
#: Keys under which a request may carry the image (form field, JSON key, or TorchServe's "body").
PAYLOAD_KEYS = ("data", "body", "file", "image", "img", "b64")
#: A JSON body is {"data": "<base64>"}: at most this many of each of { [ : , before parsing.
MAX_JSON_TOKENS = 16
_WHITESPACE = b" \t\r\n\x0b\x0c"
_FORM_ESCAPES = ((b"%2B", b"+"), (b"%2F", b"/"), (b"%3D", b"="), (b"%0A", b"\n"), (b"%0D", b"\r"), (b"%20", b" "))


def request_content_type(context, idx: int) -> str:
    """The Content-Type of request idx of the batch, lower case ("" if unknown)."""
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


def extract_payload(row, content_type: str = "") -> bytes:
    """Return the image bytes of one request row, or raise BadInput.

    A row is what TorchServe made of one request: {field or part name: value}. Only the
    types checked here go on; nothing the client sent is used as a size or a count."""
    form = content_type.startswith("application/x-www-form-urlencoded")
    json_type = content_type.startswith("application/json")
    if isinstance(row, dict):
        if len(row) > MAX_FIELDS:  # a binary body sent as a form is split into many fields too
            raise BadInput("form_urlencoded" if form else "too_many_fields", f"{len(row)} fields")
        payload = None
        for key in PAYLOAD_KEYS:
            if row.get(key) not in (None, b"", ""):
                payload = row[key]
                break
        if payload is None and row:
            if form:
                # TorchServe split a raw body at '&' and '=' into "fields": glue them back.
                payload = b"&".join(
                    _text_bytes(k) + b"=" + _text_bytes(v)
                    for k, v in row.items()
                    if isinstance(k, str) and isinstance(v, (bytes, bytearray, str))
                )
            else:
                payload = next((v for v in row.values() if v not in (None, b"", "")), None)
    else:
        payload = row
    if payload is None or (isinstance(payload, (bytes, bytearray, str)) and len(payload) == 0):
        if form:
            raise BadInput("form_urlencoded", "no usable field")
        raise BadInput("empty_body")
    if isinstance(payload, dict):  # JSON the worker decoded itself (decoding left on)
        return _from_json_object(payload, form)
    if isinstance(payload, str):  # text the worker decoded (already parsed, if it was JSON)
        try:
            return _from_bytes(payload.encode("ascii"), form, json_type=False)
        except UnicodeEncodeError:
            raise BadInput("form_urlencoded" if form else "not_an_image", "non-ASCII text")
    if not isinstance(payload, (bytes, bytearray)):
        # A number, null, a boolean or a list, decoded by the worker: never used as anything.
        raise BadInput("bad_json", f"JSON {type(payload).__name__}")
    return _from_bytes(payload, form, json_type)  # a bytearray as the worker read it: no copy


def _text_bytes(value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "replace")
    return bytes(value)


def _from_json_object(obj: dict, form: bool) -> bytes:
    for key in PAYLOAD_KEYS:
        value = obj.get(key)
        if value == "":
            raise BadInput("empty_body", "empty JSON string")
        if isinstance(value, str) and value:
            try:
                return _b64decode(value.encode("ascii"), form)
            except UnicodeEncodeError:
                raise BadInput("bad_base64", "non-ASCII text")
    raise BadInput("bad_json", "no image string in the object")


def _parse_json(data: bytes, form: bool) -> bytes:
    """A JSON body: a string, or an object with a few keys. Refused by its shape before parsing,
    so that no document becomes a big or deep structure in memory."""
    first = data[:64].lstrip(_WHITESPACE)[:1]
    if first == b'"':
        try:
            text = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise BadInput("bad_json", one_line(e))
        if not isinstance(text, str) or not text:
            raise BadInput("empty_body" if text == "" else "bad_json", "JSON string")
        return _from_json_object({"data": text}, form)
    if first != b"{":
        raise BadInput("bad_json", f"JSON starting with {first!r}")
    for token in (b"{", b"[", b":", b","):
        if data.count(token) > MAX_JSON_TOKENS:
            raise BadInput("bad_json", f"more than {MAX_JSON_TOKENS} {token.decode()!r}")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError, too many digits
        raise BadInput("bad_json", one_line(e))
    if not isinstance(obj, dict):
        raise BadInput("bad_json", type(obj).__name__)
    return _from_json_object(obj, form)


def _from_bytes(data: bytes, form: bool, json_type: bool) -> bytes:
    if data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return data
    head = data[:64].lstrip(_WHITESPACE)
    if json_type or head[:1] in (b"{", b'"'):
        return _parse_json(data, form)
    if not data.isascii():
        if form:
            raise BadInput("form_urlencoded", "binary body")
        return data  # let Pillow tell what it is (not an image, truncated, ...)
    key = head[:16].split(b"=", 1)[0].strip().decode() if b"=" in head[:16] else ""
    if key in PAYLOAD_KEYS:
        # A form body ("data=<base64>") that a proxy relabelled as octet-stream
        # (the shipped nginx site does, so that binary --data-binary survives).
        if data.count(b"&") >= MAX_FIELDS:
            raise BadInput("too_many_fields", "form body")
        for field in data.split(b"&"):
            name, _, value = field.partition(b"=")
            if name.strip().decode() == key:
                if not value.strip(_WHITESPACE):
                    raise BadInput("empty_body", "empty form field")
                return _b64decode(value, form=True, quoted=True)
    try:
        return _b64decode(data, form, strict=True)
    except BadInput as e:
        if form:
            raise BadInput("form_urlencoded", e.detail)
        raise


def _b64decode(text: bytes, form: bool, strict: bool = False, quoted: bool = False) -> bytes:
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
        raise BadInput("not_an_image" if strict else "bad_base64", one_line(e))
    if not data:
        raise BadInput("empty_body", "empty base64")
    return data

"""A request's body as the endpoints use it: image bytes, the raw phrases or classes, the flags.

Multipart forms arrive through FastAPI's ``File`` / ``Form`` parameters; the JSON form is parsed
here, with the hostile cases named (deep nesting, giant numbers, NaN/Infinity, bad UTF-8), which
``json.loads`` alone would turn into a stack overflow, minutes of big-integer parsing or values
no phrase can be.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sspsam.errors import ImageLoadError, ImageTooLargeError
from sspsam.io.images import load_image
from sspsam.io.transforms import image_key
from sspsam.serve.errors import ApiError

TRUE = {"1", "true", "yes", "on"}
MAX_JSON_DEPTH = 32
MAX_NUMBER_CHARS = 64


@dataclass
class Payload:
    image: bytes
    texts: Any  # raw phrases or classes as sent
    overlay: bool
    allow_unknown: bool = False


def content_type(headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


async def from_form(image, texts: list[str], overlay: str | None, allow_unknown: str | None,
                    text_fields: tuple[str, str]) -> Payload:
    """The multipart fields FastAPI parsed (``image`` an UploadFile or None)."""
    if image is None:
        raise ApiError(422, "missing_field", "missing field 'image': attach the image file as multipart field 'image'")
    data = await image.read()
    flag = str(overlay or "").strip().lower() in TRUE
    allow = str(allow_unknown or "").strip().lower() in TRUE
    return _checked(Payload(data, texts[0] if len(texts) == 1 else texts, flag, allow), text_fields)


def from_json(raw: bytes, text_fields: tuple[str, str]) -> Payload:
    plural, singular = text_fields
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_field", "the JSON body must be an object")
    b64 = body.get("image")
    if b64 is None:
        raise ApiError(422, "missing_field", "missing field 'image': base64 of the image file")
    if not isinstance(b64, str):
        raise ApiError(422, "invalid_field", "field 'image' must be a base64 string")
    if b64.startswith("data:") and "," in b64:  # a data URL from a browser
        b64 = b64.split(",", 1)[1]
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_request", "field 'image' is not valid base64") from None
    flag = body.get("overlay", False)
    if not isinstance(flag, bool):
        raise ApiError(422, "invalid_field", "field 'overlay' must be true or false")
    allow = body.get("allow_unknown", False)
    if not isinstance(allow, bool):
        raise ApiError(422, "invalid_field", "field 'allow_unknown' must be true or false")
    return _checked(Payload(data, body.get(plural, body.get(singular)), flag, allow), text_fields)


def _checked(payload: Payload, text_fields: tuple[str, str]) -> Payload:
    if payload.texts is None or payload.texts == []:
        plural, singular = text_fields
        raise ApiError(422, "missing_field", f"missing field '{plural}': give one or more (or '{singular}')")
    return payload


def _big_number(text: str):
    raise ValueError(f"a number of {len(text):,} characters (at most {MAX_NUMBER_CHARS})")


def _no_constant(text: str):
    raise ValueError(f"{text} is not JSON")


def parse_json(raw: bytes) -> Any:
    """json.loads with the hostile cases named: deep nesting, giant numbers, NaN/Infinity, bad UTF-8."""
    try:
        body = json.loads(
            raw,
            parse_int=lambda t: int(t) if len(t) <= MAX_NUMBER_CHARS else _big_number(t),
            parse_float=lambda t: float(t) if len(t) <= MAX_NUMBER_CHARS else _big_number(t),
            parse_constant=_no_constant,
        )
    except RecursionError:
        raise ApiError(400, "bad_request", f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ApiError(400, "bad_request", f"the body is not valid JSON ({str(exc)[:200]})") from None
    stack = [(body, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, "bad_request", f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return body


def decode_image(data: bytes, items: int = 1, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    if not data:
        raise ApiError(400, "bad_image", "the image is empty (0 bytes)")
    try:
        rgb = load_image(data, items, max_pixels)
    except ImageTooLargeError as exc:
        raise ApiError(413, "image_too_large", str(exc)) from None
    except ImageLoadError as exc:
        raise ApiError(400, "bad_image", str(exc).replace("<bytes>", "the uploaded image")) from None
    return rgb, image_key(rgb)


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


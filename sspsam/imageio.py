"""Image loading that accepts what users actually have: any path/PIL/numpy, EXIF-rotated,
grayscale, RGBA, palette, 16-bit — and refuses corrupt or absurdly large files with a clear error."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError, ImageTooLargeError

MAX_PIXELS = int(os.environ.get("SSPSAM_MAX_PIXELS", 100_000_000))  # 100 MP; SAM sees 1 MP anyway

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        hi = 1.0 if float(np.nanmax(arr, initial=0)) <= 1.0 else 255.0
        return (np.clip(np.nan_to_num(arr), 0, hi) * (255.0 / hi) + 0.5).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        # 16-bit (and wider) images use their type's full range; scale, don't clip
        maxval = 65535 if arr.max(initial=0) > 255 or arr.dtype in (np.uint16, np.int32) else 255
        return (arr.astype(np.float64) * (255.0 / maxval) + 0.5).clip(0, 255).astype(np.uint8)
    raise ImageLoadError(f"unsupported array dtype {arr.dtype}")


def _from_array(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageLoadError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(f"image has zero size {arr.shape[:2]}")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise ImageTooLargeError(f"image is {arr.shape[1]}x{arr.shape[0]}, over the {MAX_PIXELS:,}-pixel limit (SSPSAM_MAX_PIXELS)")
    arr = _to_uint8(arr)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:  # composite on white so transparent regions do not turn black
        rgb, alpha = arr[..., :3].astype(np.float32), arr[..., 3:].astype(np.float32) / 255.0
        arr = (rgb * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _from_pil(img: Image.Image) -> np.ndarray:
    if img.width * img.height > MAX_PIXELS:
        raise ImageTooLargeError(f"image is {img.width}x{img.height}, over the {MAX_PIXELS:,}-pixel limit (SSPSAM_MAX_PIXELS)")
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _from_array(np.asarray(img).astype(np.uint16 if img.mode != "I" else np.int32))
    if img.mode == "F":
        return _from_array(np.asarray(img, dtype=np.float32))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return _from_array(np.asarray(img.convert("RGBA")))
    return _from_array(np.asarray(img.convert("RGB")))


def load_image(image: ImageLike) -> np.ndarray:
    """Any supported input → HxWx3 uint8 RGB, upright."""
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, (bytes, bytearray)):
        source, name = io.BytesIO(image), "<bytes>"
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ImageLoadError(f"image not found: {path}")
        if not path.is_file():
            raise ImageLoadError(f"not a file: {path}")
        source, name = path, str(path)
    else:
        raise ImageLoadError(f"cannot read an image from {type(image).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageTooLargeError(
                        f"{name} is {img.width}x{img.height}, over the {MAX_PIXELS:,}-pixel limit (SSPSAM_MAX_PIXELS)"
                    )
                img.load()
                return _from_pil(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{name}: {exc}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name} is not an image file PIL can read (corrupt or unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{name} is corrupt or truncated ({exc})") from None

"""Image loading that accepts what users actually have: any path/bytes/PIL/numpy/torch tensor,
EXIF-rotated, grayscale, RGBA, palette, 16-bit (and http(s) URLs when the caller allows them) — and
refuses corrupt or absurdly large files with a clear error."""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sspsam.errors import ImageLoadError, ImageTooLargeError

MAX_PIXELS = int(os.environ.get("SSPSAM_MAX_PIXELS", 100_000_000))  # 100 MP; SAM sees 1 MP anyway
# Memory grows with pixels × outputs (a full-size mask per phrase, a class chunk per pixel), so a
# small file declaring 80 MP is only refused for many phrases when the cap alone is not enough.
MAX_WORK = int(os.environ.get("SSPSAM_MAX_WORK", 1_000_000_000))
# PIL's own bomb guard counts pixels in the header before decoding: make it ours, so no caller
# (or library underneath) decodes more than the cap even without going through load_image.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Modes PIL's convert("RGB") does not take or gets wrong, mapped to one that it does.
_VIA = {"La": "LA", "RGBa": "RGBA", "PA": "RGBA", "LAB": "RGB", "HSV": "RGB"}

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, "torch.Tensor"]
MAX_URL_BYTES = 50_000_000
URL_TIMEOUT_S = 20.0
_CHANNELS = (1, 3, 4)


def is_url(image: object) -> bool:
    return isinstance(image, str) and image[:8].lower().startswith(("http://", "https://"))


def is_tensor(image: object) -> bool:
    """A torch tensor, known without importing torch (the CLI must start without it)."""
    return type(image).__module__.startswith("torch") and hasattr(image, "detach")


def _from_tensor(t) -> np.ndarray:
    """A torch image → numpy HWC. Layout: CHW (torch's convention) when the first axis is 1, 3 or 4
    channels, else HWC when the last one is; 2-D is greyscale. Float values in [0, 1] are scaled to
    0..255 (as torchvision's ``to_tensor`` makes them); uint8 is taken as is."""
    t = t.detach()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3:
        if t.shape[0] in _CHANNELS and not (t.shape[-1] in _CHANNELS and t.shape[0] > t.shape[-1]):
            t = t.permute(1, 2, 0)
        elif t.shape[-1] not in _CHANNELS:
            raise ImageLoadError(f"expected a CxHxW or HxWxC image tensor (C = 1, 3 or 4), got shape {tuple(t.shape)}")
    elif t.ndim != 2:
        raise ImageLoadError(f"expected a CxHxW, HxWxC or HxW image tensor, got shape {tuple(t.shape)}")
    if t.dtype.is_complex:
        raise ImageLoadError(f"unsupported tensor dtype {t.dtype}")
    if t.is_floating_point():
        t = t.float()  # bf16 has no numpy dtype
    return t.cpu().numpy()


def fetch_url(url: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as resp:  # noqa: S310 (http/https only, checked)
            data = resp.read(MAX_URL_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ImageLoadError(f"cannot fetch {url[:200]}: {getattr(exc, 'reason', exc)}") from None
    if len(data) > MAX_URL_BYTES:
        raise ImageTooLargeError(f"{url[:200]} is over {MAX_URL_BYTES:,} bytes")
    return data


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


def check_size(width: int, height: int, items: int = 1, name: str = "image", max_pixels: int | None = None) -> None:
    """Refuse work whose size alone would exhaust memory, before any pixel is decoded."""
    pixels = int(width) * int(height)
    cap = MAX_PIXELS if max_pixels is None else min(MAX_PIXELS, max_pixels)
    if pixels > cap:
        raise ImageTooLargeError(f"{name} is {width}x{height}, over the {cap:,}-pixel limit"
                                 + (" (SSPSAM_MAX_PIXELS)" if cap == MAX_PIXELS else ""))
    if pixels * max(1, int(items)) > MAX_WORK:
        raise ImageTooLargeError(
            f"{name} is {width}x{height} and {items} outputs were asked of it: {pixels * items:,} pixel-outputs, over the "
            f"{MAX_WORK:,} budget (SSPSAM_MAX_WORK); ask fewer at once or use a smaller image"
        )


def _from_array(arr: np.ndarray, items: int = 1, max_pixels: int | None = None) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype == object or arr.dtype.kind in "USVMmc":
        raise ImageLoadError(f"unsupported array dtype {getattr(arr, 'dtype', type(arr).__name__)}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageLoadError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(f"image has zero size {arr.shape[:2]}")
    check_size(arr.shape[1], arr.shape[0], items, max_pixels=max_pixels)
    arr = _to_uint8(arr)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:  # composite on white so transparent regions do not turn black
        rgb, alpha = arr[..., :3].astype(np.float32), arr[..., 3:].astype(np.float32) / 255.0
        arr = (rgb * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _upright(img: Image.Image, name: str) -> Image.Image:
    """EXIF orientation applied; a damaged EXIF block only costs the rotation, not the image."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # struct.error, TypeError, ValueError… from malformed tags
        warnings.warn(f"{name}: unreadable EXIF block ({type(exc).__name__}: {exc}); orientation not applied", stacklevel=3)
        return img


def _pick_frame(img: Image.Image, name: str) -> None:
    """Icons hold several sizes, animations several frames: use the largest size / the first frame, said once."""
    if img.format == "ICO" and img.info.get("sizes"):
        largest = max(img.info["sizes"], key=lambda s: s[0] * s[1])
        if tuple(img.size) != tuple(largest):
            img.size = largest
    if getattr(img, "n_frames", 1) > 1:
        warnings.warn(f"{name} has {img.n_frames} frames; the first is segmented", stacklevel=3)
        img.seek(0)


def _from_pil(img: Image.Image, items: int = 1, name: str = "image", max_pixels: int | None = None) -> np.ndarray:
    check_size(img.width, img.height, items, name, max_pixels)
    try:
        img.load()  # a lazily opened file is decoded here: truncation and corruption surface now, named
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise ImageLoadError(f"{name} is corrupt or truncated ({exc})") from None
    except (AssertionError, AttributeError) as exc:  # PIL's state for a lazily opened file whose file is closed or gone
        raise ImageLoadError(f"{name} was opened lazily and its file is closed or deleted; call .load() on it "
                             f"while the file exists ({type(exc).__name__})") from None
    img = _upright(img, name)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _from_array(np.asarray(img).astype(np.uint16 if mode != "I" else np.int32), items)
    if mode == "F":
        return _from_array(np.asarray(img, dtype=np.float32), items)
    if mode in _VIA:
        try:
            img = img.convert(_VIA[mode])
        except ValueError:  # PIL cannot convert every mode to every other: refuse by name
            raise ImageLoadError(f"{name} has PIL mode '{mode}', which sspsam cannot convert to RGB") from None
        mode = img.mode
    if mode in ("RGBA", "LA") or (mode == "P" and "transparency" in img.info):
        return _from_array(np.asarray(img.convert("RGBA")), items)
    try:
        return _from_array(np.asarray(img.convert("RGB")), items)
    except ValueError:
        raise ImageLoadError(f"{name} has PIL mode '{mode}', which sspsam cannot convert to RGB") from None


def _bomb_message(name: str, exc: Exception) -> str:
    """PIL's own text quotes its limit (twice ours, the point where it raises rather than warns);
    the user can only change sspsam's, so that is the one named."""
    import re

    m = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(m.group(1)) / 1e6:,.0f} MP" if m else "more pixels than allowed"
    return (f"{name} is {size}, over sspsam's limit of {MAX_PIXELS / 1e6:g} MP (SSPSAM_MAX_PIXELS); "
            "refused before decoding (a decompression-bomb guard)")


def load_image(image: ImageLike, items: int = 1, max_pixels: int | None = None, allow_urls: bool = False) -> np.ndarray:
    """Any supported input → HxWx3 uint8 RGB, upright. ``items``: the phrases or classes that will be
    asked of it, for the pixel × outputs budget (checked from the header, before decoding);
    ``max_pixels``: a lower cap than SSPSAM_MAX_PIXELS (the service sets one); ``allow_urls``: fetch
    an http(s) URL (off by default: a library that fetches whatever string it is given is a
    server-side request forgery waiting to happen)."""
    if is_tensor(image):
        return _from_array(_from_tensor(image), items, max_pixels)
    if is_url(image):
        if not allow_urls:
            raise ImageLoadError(f"{image[:200]} is a URL; pass allow_urls=True to fetch it")
        image = fetch_url(image)
    if isinstance(image, np.ndarray):
        return _from_array(image, items, max_pixels)
    if isinstance(image, Image.Image):
        return _from_pil(image, items, max_pixels=max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        source, name = io.BytesIO(bytes(image)), "<bytes>"
    elif isinstance(image, (str, os.PathLike)):
        try:
            path = Path(image)
            if not path.exists():
                raise ImageLoadError(f"image not found: {path}")
            if not path.is_file():
                raise ImageLoadError(f"not a file: {path}")
            source = path.open("rb")  # opened here so that an unreadable file is named as such
        except OSError as exc:  # unreadable, name too long, a loop of links…
            raise ImageLoadError(f"cannot read {str(image)[:200]}: {exc.strerror or exc}") from None
        except ValueError as exc:  # NUL bytes in the name
            raise ImageLoadError(f"cannot read {str(image)[:200]!r}: {exc}") from None
        name = str(path)
    else:
        raise ImageLoadError(f"cannot read an image from {type(image).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                _pick_frame(img, name)
                return _from_pil(img, items, name, max_pixels)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(_bomb_message(name, exc)) from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name} is not an image file PIL can read (corrupt or unsupported format)") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, TypeError, ZeroDivisionError,
            MemoryError, RecursionError) as exc:  # what PIL's many decoders raise on hostile bytes
        raise ImageLoadError(f"{name} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:200]})") from None
    finally:
        source.close()


_fetch_url = fetch_url  # the earlier private name (predict/zeroshot_res.py), kept for one release

"""The weights registry: named checkpoint files, where the cache keeps them and what state they are in.

Files live at ``<SSPSAM_HOME>/weights/<filename>`` (default ``~/.cache/sspsam``). They get there
only through ``fetch`` (resumable HTTP download) or ``import_file`` (an offline copy), and both
check the file before an atomic rename, so a file in the cache is never half-written.

Missing weights are fetched on first use (``ensure``: what ``from_pretrained`` and the CLI call)
unless ``SSPSAM_OFFLINE=1`` (or ``--offline``); ``SSPSAM_WEIGHTS_MIRROR=URL`` downloads every file
as ``URL/<filename>`` instead of from the registry's address (a mirror, or a test server).

Beside each file sits ``<filename>.sha256`` in ``sha256sum`` format: the digest the file had when
it entered the cache. For a spec with a published digest it is a cheap "checked" stamp for
``list_weights``; for a spec without one it is the only reference later checks can use
(trust on first download), and the user is warned.

Downloads and imports are in :mod:`sspsam.io.download`; :mod:`sspsam.io.weights` gathers both
(the import path every caller uses).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from sspsam.errors import SSPSamError

Kind = Literal["sam", "mobile_sam", "clip", "sspsam"]
KINDS: tuple[str, ...] = get_args(Kind)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class WeightsError(SSPSamError):
    """Base of the weights channel's errors: a name, a file or a download the user can fix."""


class UnknownWeightsError(WeightsError):
    """The name is not in the registry."""


class WeightsMissingError(WeightsError):
    """The weights are registered but not in the local cache."""


class ChecksumError(WeightsError):
    """A file's sha256 or size differs from the expected one; nothing was put in the cache."""


class DownloadError(WeightsError):
    """The download failed (network, HTTP status, early end); a partial file is kept for resume."""


@dataclass(frozen=True)
class WeightSpec:
    """One checkpoint file: where it comes from and how to recognise it."""

    name: str
    url: str | None
    sha256: str | None
    size: int | None
    filename: str
    licence: str
    kind: Kind
    description: str

    def __post_init__(self) -> None:
        # Checked here so a bad registry entry fails at import time, not mid-download.
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"weights name must be a non-empty word, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.sha256 is not None and not _SHA256_RE.match(self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.size is not None and self.size <= 0:
            raise ValueError(f"{self.name}: size must be positive, got {self.size}")
        if Path(self.filename).name != self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"{self.name}: filename must be a plain file name, got {self.filename!r}")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"{self.name}: url must be http(s), got {self.url!r}")


_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_CLIP = "https://openaipublic.azureedge.net/clip/models/"
# MobileSAM's weights are committed to its GitHub repository; pinning the commit keeps the bytes
# (and so the digest) fixed even if the branch moves.
_MOBILE_SAM = "https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/f706ad9c4eb7f219c00d9050e46328518ffb65d2/"
_CLIP_B16 = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
_CLIP_L14_336 = "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"

REGISTRY: dict[str, WeightSpec] = {
    s.name: s
    for s in (
        WeightSpec(
            "sam-vit-b", _SAM + "sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383,
            "sam_vit_b_01ec64.pth", "Apache-2.0", "sam", "Segment Anything ViT-B (Meta)",
        ),
        WeightSpec(
            "sam-vit-l", _SAM + "sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1_249_524_607,
            "sam_vit_l_0b3195.pth", "Apache-2.0", "sam", "Segment Anything ViT-L (Meta)",
        ),
        WeightSpec(
            "sam-vit-h", _SAM + "sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2_564_550_879,
            "sam_vit_h_4b8939.pth", "Apache-2.0", "sam", "Segment Anything ViT-H (Meta)",
        ),
        WeightSpec(
            "mobile-sam", _MOBILE_SAM + "weights/mobile_sam.pt",
            "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f", 40_728_226,
            "mobile_sam.pt", "Apache-2.0", "mobile_sam", "MobileSAM: TinyViT-5M encoder + SAM decoder",
        ),
        # OpenAI publishes each CLIP file under a path named by its own sha256; sizes not published.
        WeightSpec(
            "clip-vit-b16", f"{_CLIP}{_CLIP_B16}/ViT-B-16.pt", _CLIP_B16, None,
            "ViT-B-16.pt", "MIT", "clip", "OpenAI CLIP ViT-B/16, 224 px (TorchScript)",
        ),
        WeightSpec(
            "clip-vit-l14-336", f"{_CLIP}{_CLIP_L14_336}/ViT-L-14-336px.pt", _CLIP_L14_336, None,
            "ViT-L-14-336px.pt", "MIT", "clip", "OpenAI CLIP ViT-L/14, 336 px (TorchScript)",
        ),
    )
}


def register(spec: WeightSpec) -> None:
    """Add or replace a registry entry (an sspsam release, a mirror, a test fixture)."""
    REGISTRY[spec.name] = spec


def get_spec(name: str) -> WeightSpec:
    """The spec for ``name``, or an error listing the names that exist."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownWeightsError(
            f"unknown weights {name!r}; known: {', '.join(sorted(REGISTRY))} (see `sspsam weights list`)"
        ) from None


def weights_home() -> Path:
    """The sspsam cache root: ``$SSPSAM_HOME``, else ``~/.cache/sspsam``."""
    return Path(os.environ.get("SSPSAM_HOME") or "~/.cache/sspsam").expanduser()


def local_path(name: str) -> Path:
    """Where the file for ``name`` lives in the cache, whether or not it is there."""
    return weights_home() / "weights" / get_spec(name).filename


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def recorded_sha256(path: Path) -> str | None:
    try:
        digest = sidecar_path(path).read_text(encoding="utf-8").split(maxsplit=1)[0].lower()
    except (OSError, IndexError):
        return None
    return digest if _SHA256_RE.match(digest) else None


def fsync_dir(path: Path) -> None:
    # Makes the rename itself durable on POSIX; Windows cannot open directories.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_sidecar(path: Path, digest: str) -> None:
    side = sidecar_path(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(f"{digest}  {path.name}\n", encoding="utf-8")
    os.replace(tmp, side)


def spec_sha256(spec: WeightSpec, dest: Path) -> str | None:
    return spec.sha256 or recorded_sha256(dest)


def expected_sha256(name: str) -> str | None:
    """The sha256 checks use for ``name``: the published one, else the one recorded at download."""
    return spec_sha256(get_spec(name), local_path(name))


def find(name: str) -> Path | None:
    """The cached file for ``name`` if it is there with the expected size; cheap (no hashing)."""
    spec = get_spec(name)
    path = local_path(name)
    if not path.is_file():
        return None
    if spec.size is not None and path.stat().st_size != spec.size:
        return None
    return path


def require(name: str) -> Path:
    """The cached file for ``name``, or an error that says exactly how to get it."""
    path = find(name)
    if path is not None:
        return path
    spec = get_spec(name)
    where = local_path(name)
    problem = (
        f"in the cache at {where} have {where.stat().st_size} bytes, expected {spec.size}"
        if where.is_file()
        else f"are not in the cache at {where}"
    )
    raise WeightsMissingError(
        f"weights {name!r} ({spec.filename}) {problem}; "
        f"download them with `sspsam weights fetch {name}`, or copy a file you already have with "
        f"`sspsam weights import {name} /path/to/{spec.filename}` "
        f"(set SSPSAM_HOME to use another cache directory than {weights_home()})"
    )


def file_hasher(path: Path) -> hashlib._Hash:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256")


def sha256_file(path: Path) -> str:
    """Streaming sha256 of a file, so multi-GB checkpoints do not need to fit in memory."""
    return file_hasher(path).hexdigest()


def verify(name: str) -> bool:
    """Re-hash the cached file and compare with the published (or recorded) sha256.

    For a spec with a published digest the observed one is written to the sidecar, so that
    ``list`` shows the outcome (verified or corrupt) without hashing again.
    """
    spec = get_spec(name)
    path = local_path(name)
    expected = spec_sha256(spec, path)
    if not path.is_file() or expected is None:
        return False
    if spec.size is not None and path.stat().st_size != spec.size:
        return False
    digest = sha256_file(path)
    if spec.sha256 is not None:
        write_sidecar(path, digest)
    return digest == expected


def status(name: str) -> str:
    """One word for ``list``, from file size and sidecar only (``verify`` re-hashes).

    missing; wrong-size; verified (last hash matched the published sha256); corrupt (it did
    not); recorded (no published sha256, the file matched the one recorded at first download);
    unchecked (no record yet: run verify).
    """
    spec = get_spec(name)
    path = local_path(name)
    if not path.is_file():
        return "missing"
    if spec.size is not None and path.stat().st_size != spec.size:
        return "wrong-size"
    recorded = recorded_sha256(path)
    if recorded is None:
        return "unchecked"
    if spec.sha256 is None:
        return "recorded"
    return "verified" if recorded == spec.sha256 else "corrupt"


def human_size(size: int | None) -> str:
    """Bytes as people read them ("375.0 MB"), in decimal units as download sizes are given."""
    if size is None:
        return "?"
    if size < 1000:
        return f"{size} B"
    value, unit = size / 1000, "KB"
    for bigger in ("MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.1f} {unit}"


def list_weights() -> list[dict]:
    """One row per registered name: name, kind, size, present, path, status, licence."""
    rows = []
    for name, spec in sorted(REGISTRY.items()):
        path = local_path(name)
        present = path.is_file()
        rows.append(
            {
                "name": name,
                "kind": spec.kind,
                "size": spec.size if spec.size is not None else (path.stat().st_size if present else None),
                "present": present,
                "path": str(path),
                "status": status(name),
                "licence": spec.licence,
                "description": spec.description,
            }
        )
    return rows


def offline() -> bool:
    """True when SSPSAM_OFFLINE says downloads are not allowed (1, true, yes, on)."""
    return os.environ.get("SSPSAM_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def source_url(name: str) -> str | None:
    """Where ``name`` is downloaded from: the mirror in SSPSAM_WEIGHTS_MIRROR if set, else the registry URL."""
    spec = get_spec(name)
    mirror = os.environ.get("SSPSAM_WEIGHTS_MIRROR", "").strip()
    if mirror:
        return mirror.rstrip("/") + "/" + spec.filename
    return spec.url

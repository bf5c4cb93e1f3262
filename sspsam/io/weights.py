"""The weights channel: a registry of named checkpoint files and a local, verified cache.

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

Why the Range/resume loop is ours (stdlib urllib, rich progress): pooch.retrieve and torch.hub.download_url_to_file verify sha256 and rename atomically but delete the partial file on any failure (no resume), and huggingface_hub's http_get resumes but retries on its own with 1-s sleeps, drops up to 10 MB of buffered bytes when a connection is cut, cannot stop an oversized body mid-stream and checks no hash.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from sspsam.errors import SSPSamError

Kind = Literal["sam", "mobile_sam", "clip", "sspsam"]
KINDS: tuple[str, ...] = get_args(Kind)
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
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


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _recorded_sha256(path: Path) -> str | None:
    try:
        digest = _sidecar(path).read_text(encoding="utf-8").split(maxsplit=1)[0].lower()
    except (OSError, IndexError):
        return None
    return digest if _SHA256_RE.match(digest) else None


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable on POSIX; Windows cannot open directories.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_sidecar(path: Path, digest: str) -> None:
    side = _sidecar(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(f"{digest}  {path.name}\n", encoding="utf-8")
    os.replace(tmp, side)


def _expected_sha256(spec: WeightSpec, dest: Path) -> str | None:
    return spec.sha256 or _recorded_sha256(dest)


def expected_sha256(name: str) -> str | None:
    """The sha256 checks use for ``name``: the published one, else the one recorded at download."""
    return _expected_sha256(get_spec(name), local_path(name))


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


def _hasher(path: Path) -> hashlib._Hash:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256")


def sha256_file(path: Path) -> str:
    """Streaming sha256 of a file, so multi-GB checkpoints do not need to fit in memory."""
    return _hasher(path).hexdigest()


def verify(name: str) -> bool:
    """Re-hash the cached file and compare with the published (or recorded) sha256.

    For a spec with a published digest the observed one is written to the sidecar, so that
    ``list`` shows the outcome (verified or corrupt) without hashing again.
    """
    spec = get_spec(name)
    path = local_path(name)
    expected = _expected_sha256(spec, path)
    if not path.is_file() or expected is None:
        return False
    if spec.size is not None and path.stat().st_size != spec.size:
        return False
    digest = sha256_file(path)
    if spec.sha256 is not None:
        _write_sidecar(path, digest)
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
    recorded = _recorded_sha256(path)
    if recorded is None:
        return "unchecked"
    if spec.sha256 is None:
        return "recorded"
    return "verified" if recorded == spec.sha256 else "corrupt"


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


def _console() -> Console:
    # Built per call so it writes to whatever sys.stderr is then (CLI runners, pytest capture).
    return Console(stderr=True)


def _warn_unverified(name: str, digest: str, dest: Path) -> None:
    message = (
        f"no published sha256 for {name!r}; the file is UNVERIFIED. Recorded sha256 {digest} in "
        f"{_sidecar(dest)}; later imports and `sspsam weights verify {name}` check against it."
    )
    _console().print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


@contextmanager
def _progress(enabled: bool, description: str, total: int | None) -> Iterator[tuple[Progress, int]]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=_console(),
        disable=not enabled,
        transient=True,
    )
    with progress:
        yield progress, progress.add_task(description, total=total)


def _check_size(spec: WeightSpec, got: int, where: str) -> None:
    if spec.size is not None and got != spec.size:
        raise ChecksumError(f"{spec.name}: {where} has {got} bytes, expected {spec.size}")


def _check_digest(spec: WeightSpec, dest: Path, expected: str | None, got: str, where: str) -> None:
    if expected is None or got == expected:
        return
    if spec.sha256 is not None:
        raise ChecksumError(f"{spec.name}: sha256 of {where} is {got}, expected {expected}")
    raise ChecksumError(
        f"{spec.name}: sha256 of {where} is {got}, expected {expected} (recorded at the first "
        f"download; delete {_sidecar(dest)} to accept a different file)"
    )


def _finish(spec: WeightSpec, tmp: Path, dest: Path, digest: str, had_expected: bool) -> Path:
    # File first: stopping between the two leaves a file with no record ("unchecked"), never a
    # record vouching for bytes that are not there.
    os.replace(tmp, dest)
    _write_sidecar(dest, digest)
    _fsync_dir(dest.parent)
    if not had_expected:
        _warn_unverified(spec.name, digest, dest)
    return dest


def _request(url: str, offset: int) -> http.client.HTTPResponse:
    headers = {"User-Agent": "sspsam-weights/1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)


def _range_start(resp: http.client.HTTPResponse) -> int | None:
    match = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _open(url: str, part: Path, offset: int) -> tuple[http.client.HTTPResponse, int]:
    """Ask for the bytes after ``offset``; return the response and where its body starts."""
    if offset:
        try:
            resp = _request(url, offset)
        except urllib.error.HTTPError as exc:
            if exc.code != 416:  # 416: the server will not resume from there
                raise
        else:
            if resp.status == 206 and _range_start(resp) == offset:
                return resp, offset
            if resp.status == 200:
                return resp, 0  # Range ignored: the body is the whole file
            resp.close()
        part.unlink(missing_ok=True)
    return _request(url, 0), 0


def _download(spec: WeightSpec, url: str, part: Path, show_progress: bool) -> str:
    """Fill ``part`` from ``url``, resuming what is already there, and return its sha256."""
    offset = part.stat().st_size if part.is_file() else 0
    if spec.size is not None and offset > spec.size:
        part.unlink()
        offset = 0
    if spec.size is not None and offset == spec.size:
        return sha256_file(part)  # complete already: the last run stopped before the rename
    resp, offset = _open(url, part, offset)
    with resp:
        h = _hasher(part) if offset else hashlib.sha256()
        length = resp.headers.get("Content-Length", "")
        total = offset + int(length) if length.isdigit() else spec.size
        with open(part, "ab" if offset else "wb") as out, \
                _progress(show_progress, spec.filename, total) as (progress, task):
            progress.advance(task, offset)
            got = offset
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
                got += len(chunk)
                progress.advance(task, len(chunk))
                if spec.size is not None and got > spec.size:
                    raise ChecksumError(f"{spec.name}: the server sent more than the expected {spec.size} bytes")
            out.flush()
            os.fsync(out.fileno())
    if spec.size is not None and got < spec.size:
        raise DownloadError(
            f"download of {spec.name} from {url} ended early at {got} of {spec.size} bytes; "
            f"the partial file {part} is kept, run the same command again to resume"
        )
    return h.hexdigest()


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


def _missing_message(names: list[str], reason: str) -> str:
    """One message for every missing file: where they would be, why they are not, the exact commands."""
    specs = [get_spec(n) for n in names]
    what = ", ".join(f"{n!r} ({s.filename})" for n, s in zip(names, specs))
    fetch_cmds = " and ".join(f"`sspsam weights fetch {n}`" for n in names)
    import_cmds = " and ".join(f"`sspsam weights import {n} /path/to/{s.filename}`" for n, s in zip(names, specs))
    return (f"weights {what} {'are' if len(names) > 1 else 'is'} not in the cache {weights_home() / 'weights'} and {reason}; "
            f"run {fetch_cmds} (a download resumes where it stopped), or copy files you already have with {import_cmds}")


def ensure_all(names: list[str], *, progress: bool = True) -> list[Path]:
    """The cached files for ``names``, each downloaded first if missing and downloads are allowed.

    Offline (SSPSAM_OFFLINE=1) or unreachable, ONE error names every missing file and the exact
    fetch/import commands. A download that fails half-way keeps its ``.part`` file, so the next
    call resumes it; a file with the wrong sha256 is deleted and reported, never cached.
    """
    paths: dict[str, Path] = {n: p for n in names if (p := find(n)) is not None}
    missing = [n for n in names if n not in paths]
    if missing and offline():
        raise WeightsMissingError(_missing_message(missing, "downloads are off (--offline / SSPSAM_OFFLINE=1)"))
    for i, name in enumerate(missing):
        url = source_url(name)
        if url is None:
            raise WeightsMissingError(_missing_message(missing[i:], f"{name} has no public download URL"))
        try:
            paths[name] = fetch(name, url=url, progress=progress)
        except DownloadError as exc:
            cause = exc.__cause__
            reason = getattr(cause, "reason", None) or cause or exc
            raise WeightsMissingError(_missing_message(missing[i:], f"could not be downloaded from {url} ({reason})")) from None
    return [paths[n] for n in names]


def ensure(name: str, *, progress: bool = True) -> Path:
    """``ensure_all`` for one name."""
    return ensure_all([name], progress=progress)[0]


def fetch(name: str, *, url: str | None = None, progress: bool = True, force: bool = False) -> Path:
    """Download ``name`` into the cache, resumably, verifying size and sha256 before it lands.

    ``url`` overrides the registry's (a mirror, or a local server in tests). An existing file
    of the right size is kept unless ``force``. On a digest mismatch nothing stays in the cache;
    on a network error the ``.part`` file stays so the next call resumes.
    """
    spec = get_spec(name)
    source = url or source_url(name)
    if source is None:
        raise DownloadError(
            f"{name} has no public download URL; get {spec.filename} elsewhere and run "
            f"`sspsam weights import {name} /path/to/{spec.filename}`"
        )
    if not source.startswith(("http://", "https://")):
        raise DownloadError(f"cannot download {name} from {source!r}: only http(s) URLs are supported")
    dest = local_path(name)
    if not force and find(name) is not None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part(dest)
    expected = _expected_sha256(spec, dest)
    try:
        digest = _download(spec, source, part, progress)
        _check_size(spec, part.stat().st_size, "the download")
        _check_digest(spec, dest, expected, digest, "the download")
    except ChecksumError:
        part.unlink(missing_ok=True)  # the bytes are wrong; resuming them would not help
        raise
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"download of {name} from {source} failed: HTTP {exc.code} {exc.reason}") from exc
    except ValueError as exc:  # a malformed URL (bad port, bad IPv6 literal)
        raise DownloadError(f"cannot download {name} from {source!r}: malformed URL ({exc})") from None
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        kept = part.stat().st_size if part.is_file() else 0
        retry = (
            f"{kept} bytes are kept in {part}, run the same command again to resume" if kept
            else "run the same command again to retry"
        )
        raise DownloadError(
            f"download of {name} from {source} failed: {reason}; {retry} "
            f"(offline? copy the file over and use `sspsam weights import {name} /path/to/{spec.filename}`)"
        ) from exc
    return _finish(spec, part, dest, digest, expected is not None)


def import_file(name: str, src: Path | str) -> Path:
    """Copy a file you already have into the cache after checking its size and sha256.

    For machines without internet. The copy goes to a temporary file in the cache directory,
    is fsynced, checked, then renamed, so a failed import leaves nothing behind.
    """
    spec = get_spec(name)
    src = Path(src).expanduser()
    if not src.is_file():
        raise WeightsError(f"cannot import {name}: {src} is not a file")
    _check_size(spec, src.stat().st_size, str(src))
    dest = local_path(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected = _expected_sha256(spec, dest)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            while chunk := f.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        _check_digest(spec, dest, expected, digest, str(src))
        return _finish(spec, tmp, dest, digest, expected is not None)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""Getting weights into the cache: a resumable, verified HTTP download (``fetch``; ``ensure`` on
first use) and an offline copy (``import_file``). Both check size and sha256 before an atomic
rename, so a file in the cache is never half-written.

Why the Range/resume loop is ours (stdlib urllib, rich progress): pooch.retrieve and
torch.hub.download_url_to_file verify sha256 and rename atomically but delete the partial file on
any failure (no resume), and huggingface_hub's http_get resumes but retries on its own with
sleeps, drops buffered bytes when a connection is cut, cannot stop an oversized body mid-stream
and checks no hash.
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
from pathlib import Path

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

from sspsam.io.weights_registry import (
    ChecksumError,
    DownloadError,
    WeightsError,
    WeightSpec,
    WeightsMissingError,
    find,
    fsync_dir,
    file_hasher,
    get_spec,
    local_path,
    offline,
    part_path,
    sha256_file,
    sidecar_path,
    source_url,
    spec_sha256,
    weights_home,
    write_sidecar,
)

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


def _console() -> Console:
    # Built per call so it writes to whatever sys.stderr is then (CLI runners, pytest capture).
    return Console(stderr=True)


def _warn_unverified(name: str, digest: str, dest: Path) -> None:
    message = (
        f"no published sha256 for {name!r}; the file is UNVERIFIED. Recorded sha256 {digest} in "
        f"{sidecar_path(dest)}; later imports and `sspsam weights verify {name}` check against it."
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
        f"download; delete {sidecar_path(dest)} to accept a different file)"
    )


def _finish(spec: WeightSpec, tmp: Path, dest: Path, digest: str, had_expected: bool) -> Path:
    # File first: stopping between the two leaves a file with no record ("unchecked"), never a
    # record vouching for bytes that are not there.
    os.replace(tmp, dest)
    write_sidecar(dest, digest)
    fsync_dir(dest.parent)
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
        h = file_hasher(part) if offset else hashlib.sha256()
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
    part = part_path(dest)
    expected = spec_sha256(spec, dest)
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
    expected = spec_sha256(spec, dest)
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

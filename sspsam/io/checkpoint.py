"""Reading official and sspsam checkpoints with errors that name the problem; atomic writes."""

from __future__ import annotations

import argparse
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from sspsam.errors import CheckpointError, OutputError

FORMAT_VERSION = 1


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    # Training frameworks nest the weights under a few customary keys.
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the file holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.split("/", 1)[-1].startswith("code/") for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def _reason(exc: Exception) -> str:
    """torch's own text, less its advice to retry with ``weights_only=False``: that runs whatever
    code a hostile file carries, and sspsam never does it."""
    text = " ".join(str(exc).split())
    if "weights_only" in text or "weights only load failed" in text.lower():
        import re

        m = re.search(r"(Unsupported (?:global|operand)[^.;(]*|WeightsUnpickler error: [^.;(]*)", text)
        detail = f": {m.group(1).split(' Check ')[0].strip()[:120]}" if m else ""
        return f"not a plain weights file{detail}"
    return f"{type(exc).__name__}: {text[:200]}"


def _corrupt(what: str, path: Path, exc: Exception, hint: str = "") -> CheckpointError:
    return CheckpointError(f"{what} {path} is truncated or corrupt ({_reason(exc)})" + (f"; {hint}" if hint else ""))


def _load(path: Path) -> Any:
    # Weights only; DETR-style training checkpoints (the official SSP-SAM ones) also pickle their
    # argparse.Namespace, which is plain data. Zip files are memory-mapped: no second copy in RAM.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def torch_load(path: str | os.PathLike, what: str, hint: str = "") -> Any:
    """torch.load (weights only) whose many failure types for cut or damaged files become one named error."""
    try:
        return _load(Path(path))
    except Exception as exc:
        raise _corrupt(what, Path(path), exc, hint) from exc


def read_state_dict(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load tensors from a .pth/.pt (pickle or TorchScript, e.g. OpenAI CLIP) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} file is empty: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        if _is_torchscript(path):
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        obj = _load(path)
    except Exception as exc:  # torch raises several types for truncated zips and pickles
        raise _corrupt(f"{what} file", path, exc, "download or import it again") from exc
    try:
        return unwrap_state_dict(obj.get("state_dict", obj) if isinstance(obj, Mapping) and "sspsam" in obj else obj)
    except CheckpointError as exc:
        raise CheckpointError(f"{what} file {path}: {exc}") from None


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, strict: bool = True) -> None:
    """load_state_dict with a readable report of missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
    if strict and missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if problems:
        raise CheckpointError(
            f"{what}: the checkpoint does not fit this model: " + "; ".join(problems)
            + " — is it a checkpoint for another model variant?"
        )
    module.load_state_dict(state_dict, strict=strict)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` and move the result into place, so readers never see half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # a file where the folder should be, no permission, a read-only disk
        raise _write_error(path, exc) from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)  # the previous file, if any, is untouched
        if isinstance(exc, OSError) or (type(exc) is RuntimeError and _torch_write_failure(exc, path.parent)):
            raise _write_error(path, exc) from None
        raise
    return path


def _torch_write_failure(exc: RuntimeError, folder: Path) -> bool:
    """torch.save reports a full disk as a RuntimeError from its C++ writer ("file write failed",
    "basic_ios::clear: iostream error", "unexpected pos …"), not as an OSError."""
    text = str(exc).lower()
    if any(m in text for m in ("writ", "iostream", "inline_container", "unexpected pos")):
        return True
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def _write_error(path: Path, exc: BaseException) -> OutputError:
    reason = getattr(exc, "strerror", None)
    if not reason:
        try:
            full = os.statvfs(path.parent).f_bavail == 0
        except OSError:
            full = False
        reason = "No space left on device" if full else str(exc).splitlines()[0][:200]
    return OutputError(f"cannot write {path}: {reason}; nothing was changed there")


def save_checkpoint(path: str | os.PathLike, config: dict, state_dict: Mapping[str, torch.Tensor], **extra) -> Path:
    """An sspsam checkpoint: the config travels with the weights, so a file alone rebuilds the model."""
    payload = {"sspsam": FORMAT_VERSION, "config": config, "state_dict": dict(state_dict), **extra}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def check_crc(path: Path) -> None:
    """torch's zip records carry CRC-32s that torch.load never checks: a flipped bit in the weights
    would load and give silently wrong masks. Checking them costs about 1 s per GB."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError):
        return  # not a zip (a legacy pickle, or damage torch_load will name)
    except Exception as exc:  # zlib errors on damaged compressed members
        raise CheckpointError(f"model checkpoint {path} is corrupt ({type(exc).__name__}: {str(exc)[:200]})") from None
    if bad is not None:
        raise CheckpointError(f"model checkpoint {path} is corrupt: record {bad.split('/', 1)[-1]} fails its CRC check; "
                              "copy or download it again")


class OutputSet:
    """A command's output files, which appear together or not at all.

    Each file is written under a temporary name in its folder; only when every one is written and
    synced are they renamed into place, one rename each. An error before that (a full disk, an
    overlay that cannot be drawn, Ctrl-C) removes the temporary files, and the folder too when this
    set created it, so a failed command leaves the output folder as it found it::

        with OutputSet(folder) as out:
            out.add("a.png", lambda tmp: image.save(tmp, format="PNG"))
            out.add("a.json", lambda tmp: Path(tmp).write_text(text))
        out.paths  # the final paths, once the block is left without an error
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.created = False
        self._pending: list[tuple[str, Path]] = []
        self.paths: list[Path] = []

    def __enter__(self) -> "OutputSet":
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"output {self.folder} exists and is not a folder; give a folder")
        try:
            if not self.folder.exists():
                self.folder.mkdir(parents=True)
                self.created = True
        except OSError as exc:
            raise _write_error(self.folder / "-", exc) from None
        return self

    def add(self, name: str, write) -> Path:
        target = self.folder / name
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name[:200]}.", suffix=".tmp", dir=self.folder)
            os.close(fd)
        except OSError as exc:
            raise _write_error(target, exc) from None
        self._pending.append((tmp, target))
        try:
            write(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)
        except OSError as exc:
            raise _write_error(target, exc) from None
        except RuntimeError as exc:
            if _torch_write_failure(exc, self.folder):
                raise _write_error(target, exc) from None
            raise
        return target

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            try:
                for tmp, target in self._pending:
                    os.replace(tmp, target)
                    self.paths.append(target)
                return
            except OSError as err:  # a rename can only fail for a vanished folder or a name in the way
                for done in self.paths:
                    done.unlink(missing_ok=True)
                self.paths = []
                self._abort()
                raise _write_error(self.folder, err) from None
        self._abort()

    def _abort(self) -> None:
        for tmp, _ in self._pending:
            Path(tmp).unlink(missing_ok=True)
        if self.created:
            try:
                self.folder.rmdir()
            except OSError:
                pass


# The names models/build.py imported before they were public; kept for one release.
_unwrap = unwrap_state_dict
_check_crc = check_crc

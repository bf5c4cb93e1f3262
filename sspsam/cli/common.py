"""What every `sspsam` command shares: one plain `error: …` line and exit code 2, warnings on
stderr, checked input paths, and output names that fit the file system.

Nothing here imports torch, numpy or rich: `sspsam --help` must stay instant.
"""

from __future__ import annotations

import contextvars
import errno
import hashlib
import os
import sys
from pathlib import Path

import typer
import typer.core

try:  # typer >= 0.20 vendors its own click; older typer uses click itself
    from typer import _click as click
except ImportError:  # pragma: no cover - depends on the typer release
    import click

from sspsam.errors import ImageLoadError, SSPSamError, one_line

EXIT_ERROR = 2
_MAX_NAME_BYTES = 255
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def say_error(message: object) -> None:
    # Plain text, never Rich markup: a file called "[/red].png" must print as itself.
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.stderr.flush()


def say_info(message: object) -> None:
    sys.stderr.write(f"info: {one_line(message)}\n")
    sys.stderr.flush()


def say_warning(message: object) -> None:
    sys.stderr.write(f"warning: {one_line(message)}\n")
    sys.stderr.flush()


def fail(exc: object) -> "typer.Exit":
    """Print one `error:` line and stop with exit code 2 (use as `raise fail(exc)`)."""
    say_error(os_error_message(exc) if isinstance(exc, OSError) else exc)
    return typer.Exit(EXIT_ERROR)


def os_error_message(exc: OSError) -> str:
    what = exc.strerror or type(exc).__name__
    name = exc.filename
    if name is None:
        return what
    shown = str(name) if len(str(name)) <= 120 else str(name)[:100] + "…"
    return f"{shown}: {what[0].lower() + what[1:]}"


def check_input_file(path: Path, what: str = "image") -> Path:
    """A readable regular file, or a named error (missing, a folder, unreadable, name too long)."""
    try:
        if not path.exists():
            raise ImageLoadError(f"{what} not found: {path}")
        if not path.is_file():
            raise ImageLoadError(f"{what} is not a file: {path}")
        with open(path, "rb"):
            pass
    except PermissionError:
        raise ImageLoadError(f"cannot read {what} {path}: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise ImageLoadError(f"{what} file name is too long ({len(str(path))} characters): {str(path)[:60]}…") from None
        raise ImageLoadError(f"cannot read {what} {path}: {os_error_message(exc)}") from None
    return path


def output_stem(image: Path, suffix_room: int = 40) -> str:
    """The image's stem, shortened (with a hash, so names stay distinct) if outputs would not fit NAME_MAX."""
    stem = image.stem or "image"
    room = _MAX_NAME_BYTES - suffix_room
    if len(stem.encode()) <= room:
        return stem
    digest = hashlib.sha256(stem.encode()).hexdigest()[:10]
    cut = stem.encode()[: room - 11].decode(errors="ignore")
    return f"{cut}-{digest}"


def check_output_dir(output: Path, create: bool = True) -> Path:
    """Create the output folder (``create=False``: only check it could be), or a named error
    (a file in the way, no permission). Checked before the work, created after it, so a failed
    run leaves not even an empty folder."""
    try:
        if output.exists() and not output.is_dir():
            raise SSPSamError(f"output {output} exists and is not a folder; give -o a folder")
        if not create:
            return output
        output.mkdir(parents=True, exist_ok=True)
        if not os.access(output, os.W_OK):
            raise SSPSamError(f"output folder {output} is not writable")
    except OSError as exc:
        raise SSPSamError(f"cannot create output folder {output}: {os_error_message(exc)}") from None
    return output


THREADS_HELP = ("CPU threads for torch (default: measured best here, see benchmarks/latency.py: 1 when other work "
                "keeps a core busy, else all cores).")
QUANTIZE_HELP = "none | int8: dynamic int8 Linear layers on CPU (opt-in; faster text/decoder, masks agree >= 99 % on the demo)."


DTYPE_HELP = ("auto (bf16 where the hardware has bf16 units: CUDA with bf16 support, a CPU with AMX-BF16 or "
              "AVX512-BF16; else fp32; SSPSAM_DTYPE overrides auto) | fp32 (the exact fp32 path) | bf16 | fp16.")
#: the --dtype names (sspsam.predict.precision.DTYPES, named here so that --help never imports torch)
DTYPE_NAMES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "half")


def check_speed_options(threads: int | None, quantize: str, dtype: str = "auto") -> None:
    """Cheap checks of --threads / --quantize / --dtype before anything loads."""
    if threads is not None and threads < 1:
        raise SSPSamError(f"--threads must be >= 1, got {threads}")
    if quantize not in ("none", "int8"):
        raise SSPSamError(f"--quantize must be none or int8, got {quantize!r}")
    if dtype.lower() not in DTYPE_NAMES:
        raise SSPSamError(f"--dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    if quantize == "int8" and dtype.lower() not in ("auto", "fp32", "float32"):
        raise SSPSamError("--quantize int8 runs fp32 activations; use it with --dtype fp32 (or auto)")


def model_dtype_args(dtype: str, quantize: str = "none") -> str:
    """The predictor's dtype for the CLI's --dtype: int8's dynamic kernels take fp32 activations,
    so --quantize int8 turns auto into fp32 rather than quantising bf16 weights."""
    return "fp32" if quantize == "int8" and dtype.lower() == "auto" else dtype


def say_dtype(predictor) -> None:
    """The `info:` line naming what --dtype auto picked and why (an explicit choice needs none)."""
    reason = getattr(predictor, "dtype_reason", "")
    if reason.startswith("auto"):
        say_info(f"running in {predictor.dtype_name} ({reason}); --dtype fp32 for the fp32 path")


def dtype_of(predictor) -> str:
    """What outputs' metadata records as the dtype ('float32' for runtimes without a choice)."""
    return getattr(predictor, "dtype_name", "float32")


def apply_threads(threads: int | None) -> None:
    import sspsam.backbones.runtime as runtime

    runtime.set_threads(runtime.default_threads() if threads is None else threads)


def go_offline(offline: bool) -> None:
    """--offline for a command that loads weights deep inside a long job (training, caching,
    export): no download for the rest of the process, as SSPSAM_OFFLINE=1 would say."""
    if offline:
        os.environ["SSPSAM_OFFLINE"] = "1"


def apply_quantize(predictor, quantize: str) -> None:
    """--quantize on a loaded predictor (:func:`sspsam.predict.precision.quantize_predictor`)."""
    from sspsam.predict.precision import quantize_predictor

    quantize_predictor(predictor, quantize)


def load_predictor(predictor, model: str, device: str, dtype: str = "auto", quantize: str = "none"):
    """``predictor.from_pretrained`` in --dtype (auto turns fp32 under --quantize int8), int8 where
    --quantize says; a dtype the device cannot run is a one-line error, not a traceback."""
    try:
        loaded = predictor.from_pretrained(model, device=device, dtype=model_dtype_args(dtype, quantize))
    except ValueError as exc:  # fp16 on a CPU torch without it, say
        raise SSPSamError(str(exc)) from None
    apply_quantize(loaded, quantize)
    return loaded


_ARGV: "contextvars.ContextVar[list[str]]" = contextvars.ContextVar("sspsam_argv", default=[])


def after_double_dash() -> int:
    """How many command-line words follow the first ``--``: those are arguments by the user's
    explicit choice, even when they look like options (a phrase "-o", "--help")."""
    argv = _ARGV.get()
    return len(argv) - argv.index("--") - 1 if "--" in argv else 0


class Group(typer.core.TyperGroup):
    """The top-level command group: every error, ours or click's usage errors, becomes one
    `error: …` line on stderr and exit code 2 — never a traceback, a box or two messages."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _ARGV.set(list(args) if args is not None else sys.argv[1:])
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except _NO_ARGS_IS_HELP as exc:  # bare `sspsam` / `sspsam weights`: the help, not an error line
            exc.show()
            code = exc.exit_code
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            say_error(exc.format_message() + hint)
            code = EXIT_ERROR
        except typer.Abort:
            say_error("aborted")
            code = 130
        except SSPSamError as exc:
            say_error(exc)
            code = EXIT_ERROR
        except OSError as exc:  # a file the user named: too long, unreadable, disk full
            say_error(os_error_message(exc))
            code = EXIT_ERROR
        if standalone_mode:
            sys.exit(code)
        return code


class offline_mode:
    """``--offline``: set SSPSAM_OFFLINE=1 while a model loads, so nothing is downloaded."""

    def __init__(self, on: bool):
        self.on, self.old = on, None

    def __enter__(self):
        import os

        if self.on:
            self.old = os.environ.get("SSPSAM_OFFLINE")
            os.environ["SSPSAM_OFFLINE"] = "1"

    def __exit__(self, *exc):
        import os

        if self.on:
            if self.old is None:
                os.environ.pop("SSPSAM_OFFLINE", None)
            else:
                os.environ["SSPSAM_OFFLINE"] = self.old


DEVICE_HELP = "torch device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps."
OFFLINE_HELP = "Never download missing weights (also: SSPSAM_OFFLINE=1)."


# The options every command that loads or runs a model shares: one spelling, one default and one
# help text wherever they appear (a new instance per command, as typer wants).
def device_option(extra: str = ""):
    return typer.Option("auto", "--device", help=DEVICE_HELP + extra)


def offline_option():
    return typer.Option(False, "--offline", help=OFFLINE_HELP)


def threads_option(extra: str = ""):
    return typer.Option(None, "--threads", help=THREADS_HELP + extra)


def quantize_option():
    return typer.Option("none", "--quantize", help=QUANTIZE_HELP)


def dtype_option(extra: str = ""):
    return typer.Option("auto", "--dtype", help=DTYPE_HELP + extra)


def abort(exc: Exception) -> None:
    """Exit with ``exc`` as the one-line error (what :func:`fail` builds)."""
    raise fail(exc)

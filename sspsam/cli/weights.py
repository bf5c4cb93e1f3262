"""`sspsam weights ...`: the weights channel on the command line (mounted by the main CLI)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from sspsam.cli.common import fail


class _LazyWeights:
    """``sspsam.io.weights`` on first attribute use, so `sspsam --help` does not load urllib and rich."""

    def __getattr__(self, name: str):
        import sspsam.io.weights as module

        return getattr(module, name)


weights = _LazyWeights()

app = typer.Typer(
    help=(
        "Checkpoint files (SAM, MobileSAM, CLIP): list them, download them, import copies you already "
        "have (offline machines), and check them. They are cached under $SSPSAM_HOME/weights "
        "(default ~/.cache/sspsam/weights)."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: no Rich import for `--help`
)

T = TypeVar("T")
NameArg = Annotated[str, typer.Argument(help="Registered weights name, e.g. sam-vit-b (see `sspsam weights list`); fetch also takes hf-hub:OWNER/REPO[/PATH][@REVISION].")]
_STATUS_STYLE = {"verified": "green", "recorded": "yellow", "unchecked": "yellow", "missing": "dim"}


def _run(fn: Callable[[], T]) -> T:
    """Turn the channel's errors into one `error:` line on stderr and exit code 2, not a traceback."""
    try:
        return fn()
    except weights.WeightsError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; run the same command again (a download resumes where it stopped)", err=True)
        raise typer.Exit(130) from None


@app.command("list")
def list_cmd() -> None:
    """Show every registered checkpoint, whether it is cached, and its check status.

    The status comes from the file size and the hash recorded at download, without re-hashing.

    verified / corrupt: the last hash did / did not match the published sha256.

    recorded: no sha256 is published; the file matched the one recorded at download.

    unchecked: no hash recorded yet (run `sspsam weights verify NAME`). Also: wrong-size, missing.
    """
    from rich.console import Console
    from rich.table import Table

    from rich.text import Text

    table = Table(title=Text(f"weights in {weights.weights_home() / 'weights'}"))  # a path is not markup
    for column in ("name", "kind", "size", "status", "licence"):
        table.add_column(column, no_wrap=True)
    for row in weights.list_weights():
        style = _STATUS_STYLE.get(row["status"], "red")
        table.add_row(
            row["name"], row["kind"], weights.human_size(row["size"]), f"[{style}]{row['status']}[/]", row["licence"]
        )
    from sspsam.io.hub import cache_dir, cached_models

    hub = cached_models()
    if hub:
        table.add_section()
        for row in hub:
            table.add_row(row["name"], "hub", weights.human_size(row["size"]), "[green]cached[/]", "see its model card")
    Console().print(table)
    if hub:
        Console().print(Text(f"hub checkpoints from {cache_dir()}"))


@app.command()
def fetch(
    name: NameArg,
    url: Annotated[
        str | None, typer.Option("--url", help="Download from this http(s) URL instead of the registry's (a mirror).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if the file is already cached.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Download NAME into the cache, checking its size and sha256; prints the path.

    An interrupted download resumes on the next run. A file with the wrong sha256 is deleted, never cached.
    """
    if name.startswith("hf-hub:"):
        from sspsam.io.hub import download

        if url is not None or force:
            raise fail("--url and --force are for registered weights; a hub file is fetched through huggingface_hub's cache")
        typer.echo(_run(lambda: download(name, progress=not quiet)))
        return
    typer.echo(_run(lambda: weights.fetch(name, url=url, progress=not quiet, force=force)))


@app.command("import")
def import_cmd(
    name: NameArg,
    file: Annotated[Path, typer.Argument(help="The checkpoint file you already have.", show_default=False)],
) -> None:
    """Copy FILE into the cache as NAME after checking its size and sha256 (for offline machines)."""
    typer.echo(_run(lambda: weights.import_file(name, file)))


@app.command()
def path(name: NameArg) -> None:
    """Print the cached file's path; exit 1 (with how to get it) if it is not cached."""
    typer.echo(_run(lambda: weights.require(name)))


@app.command()
def verify(name: NameArg) -> None:
    """Re-hash the cached file of NAME and compare with its sha256; exit 1 if it does not match."""

    def check() -> bool:
        weights.require(name)  # missing: say how to get it, rather than "does not match"
        return weights.verify(name)

    if not _run(check):
        spec = weights.get_spec(name)
        expected = weights.expected_sha256(name)
        problem = (
            f"does not match the expected sha256 {expected}" if expected
            else "has no sha256 to be checked against (none published, none recorded)"
        )
        raise fail(
            f"{name}: {weights.local_path(name)} {problem}; run `sspsam weights fetch {name} --force` or "
            f"`sspsam weights import {name} /path/to/{spec.filename}`"
        )
    typer.echo(f"{name}: OK ({weights.local_path(name)})")

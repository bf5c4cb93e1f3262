"""`sspsam` command line: the typer app, with one module per command (segment, ovss, batch,
track, serve, train, cache-features, evaluate, models, push, weights, export) in this package.

Only typer and click load at start-up: torch, numpy and the model code are imported inside the
command that needs them, so `sspsam --help` answers at once. Every error is one `error: …` line
on stderr with exit code 2 (:class:`sspsam.cli.common.Group`).
"""

from __future__ import annotations

import sys

import typer

import sspsam.cli.batch as cli_batch
import sspsam.cli.cache as cli_cache
import sspsam.cli.evaluate as cli_evaluate
import sspsam.cli.export as cli_export
import sspsam.cli.models as cli_models
import sspsam.cli.ovss as cli_ovss
import sspsam.cli.push as cli_push
import sspsam.cli.segment as cli_segment
import sspsam.cli.serve as cli_serve
import sspsam.cli.track as cli_track
import sspsam.cli.train as cli_train
import sspsam.cli.weights as cli_weights
from sspsam import __version__
from sspsam.cli.common import Group


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sspsam {__version__}")
        raise typer.Exit()


app = typer.Typer(
    cls=Group,
    rich_markup_mode=None,
    help="Language-guided segmentation with SAM and CLIP (SSP-SAM).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the sspsam version and exit."),
) -> None:
    """Language-guided segmentation with SAM and CLIP (SSP-SAM)."""


app.command("segment")(cli_segment.segment)
app.command("ovss")(cli_ovss.ovss)
app.command("batch")(cli_batch.batch)
app.command("serve")(cli_serve.serve)
app.command("track")(cli_track.track)


app.command("train")(cli_train.train)
app.command("cache-features")(cli_cache.cache_features)
app.command("evaluate")(cli_evaluate.evaluate)
app.command("models")(cli_models.models)
app.command("push")(cli_push.push)


app.add_typer(cli_weights.app, name="weights", help="List, fetch, import and verify checkpoint files (offline-friendly).")
app.add_typer(cli_export.app, name="export", help="Export a model to ONNX (`sspsam export onnx MODEL -o DIR`).")
app.add_typer(__import__("sspsam.cli.tools", fromlist=["app"]).app, name="tools", help="Developer tools: fidelity reports, synthetic data sets.")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="sspsam")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

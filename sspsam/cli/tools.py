"""`sspsam tools ...`: the developer commands that were `python -m` mains of library modules:
fidelity reports against the golden fixtures and the synthetic data-set writers (mounted by the
main CLI).

Each command imports its module when it runs, so `sspsam --help` loads no torch or numpy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from sspsam.cli.common import fail

app = typer.Typer(
    help="Developer tools: fidelity reports against the official code, synthetic data sets.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _split(values: list[str] | None) -> list[str]:
    """Repeated options, each of which may also hold a comma-separated list."""
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


@app.command("fidelity")
def fidelity(
    fixture: Optional[list[str]] = typer.Option(None, "--fixture", metavar="NAME", help="Only this SSP-SAM fixture (repeat for more; default all)."),
    no_clip: bool = typer.Option(False, "--no-clip", help="Skip the SCLIP / CLIP-Surgery / TinyViT rows."),
    precision: Optional[list[str]] = typer.Option(
        None, "--precision", metavar="PRECISION",
        help="Also run the SSP-SAM fixtures in this reduced precision: bf16, int8 (repeat, or comma-separate; masks must agree >= 99 %)."),
) -> None:
    """Max abs difference to the official reference outputs, per golden fixture and quantity
    (exit 1 when a row is out of tolerance)."""
    import sspsam.tools.fidelity as report

    try:
        code = report.report(_split(fixture) or None, clip=not no_clip, precisions=tuple(_split(precision)))
    except ValueError as exc:
        raise fail(exc) from None
    raise typer.Exit(code)


@app.command("fidelity-clip")
def fidelity_clip() -> None:
    """Only the SCLIP / CLIP-Surgery / TinyViT rows (exit 1 when a row is out of tolerance)."""
    import sspsam.tools.fidelity_clip as clip

    rows = clip.checks()
    print(clip.format_rows(rows))
    raise typer.Exit(0 if all(clip.passed(r) for r in rows) else 1)


@app.command("generate-data")
def generate_data(
    kind: str = typer.Argument(..., help="refcoco, refcoco+, refcocog, grefcoco or phrasecut."),
    root: Path = typer.Argument(..., help="Folder to write (for phrasecut: the VGPhraseCut_v0 folder)."),
    n: int = typer.Option(20, "--n", help="Number of images."),
    seed: int = typer.Option(0, "--seed"),
    split_by: Optional[str] = typer.Option(None, "--split-by", help="unc / umd / google (RefCOCO family)."),
    ext: str = typer.Option("jpg", "--ext", help="Image format: jpg or png."),
    official: bool = typer.Option(False, "--official",
                                  help="Also write the official SSP-SAM layout (ROOT/data_seg/anns, ROOT/data_seg/masks, ROOT/data/)."),
) -> None:
    """Write a tiny synthetic data set in the exact distributed layout; prints its summary as JSON."""
    from sspsam.data.generate import generate

    try:
        summary = generate(kind, root, n, seed, split_by=split_by, image_ext=ext, official=official)
    except ValueError as exc:
        raise fail(exc) from None
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")


@app.command("generate-semseg")
def generate_semseg(
    root: Path = typer.Argument(..., help="Folder to write (the generic semantic-segmentation layout)."),
    n: int = typer.Option(64, "--n", help="Images per split."),
    size: int = typer.Option(128, "--size", help="Longer image side."),
    seed: int = typer.Option(0, "--seed"),
    splits: str = typer.Option("train,val", "--splits", help="Comma-separated split names."),
) -> None:
    """Write a synthetic semantic-segmentation set of coloured shapes; prints its summary as JSON."""
    from sspsam.data.semseg import generate_semseg as write

    try:
        summary = write(root, n=n, size=size, seed=seed, splits=tuple(_split([splits])))
    except (ValueError, RuntimeError) as exc:  # a size too small to place the shapes
        raise fail(exc) from None
    print(json.dumps(summary))


@app.command("shapes-eval")
def shapes_eval(
    model: str = typer.Option("shapes-demo", "--model", "-m", help="Bundled model name or checkpoint path."),
    scenes: int = typer.Option(200, "--scenes", min=1, help="Held-out generated scenes to score."),
    seed0: Optional[int] = typer.Option(None, "--seed0", help="First scene seed (default: the held-out range)."),
) -> None:
    """The per-family table (colour, shape, position, relation, size, multi, absent) of a referring
    model on held-out generated shape scenes: what the bundled demo's README figures come from."""
    from sspsam.engine.shapes_eval import HELDOUT_SEED0, report
    from sspsam.errors import SSPSamError

    try:
        print(report(model, scenes, HELDOUT_SEED0 if seed0 is None else seed0))
    except (SSPSamError, ValueError) as exc:
        raise fail(exc) from None

"""`sspsam push MODEL_DIR hf-hub:OWNER/REPO`: publish a trained checkpoint with its model card."""

from __future__ import annotations

from pathlib import Path

import typer

from sspsam.cli.common import fail
from sspsam.errors import SSPSamError


def push(
    source: Path = typer.Argument(..., help="A run folder `sspsam train` wrote (its model.pt) or an sspsam checkpoint file.", show_default=False),
    name: str = typer.Argument(..., help="hf-hub:OWNER/REPO (or hf-hub:OWNER/REPO/FOLDER, @BRANCH to pick a branch).", show_default=False),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    message: str = typer.Option("Upload sspsam checkpoint", "--message", "-m", help="The commit message."),
) -> None:
    """Upload a trained sspsam checkpoint and a model card (config, training data, metrics of
    `sspsam evaluate` runs found in the folder) to the Hugging Face Hub; `-m hf-hub:OWNER/REPO` then
    loads it anywhere. Needs write access: `hf auth login` or HF_TOKEN."""
    from sspsam.io.hub import push as push_checkpoint
    from sspsam.models.registry import commands_by_type

    try:
        url = push_checkpoint(source, name, private=private, message=message, commands=commands_by_type())
    except SSPSamError as exc:
        raise fail(exc) from None
    typer.echo(f"pushed {source} to {name}: {url}")

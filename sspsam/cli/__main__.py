"""`python -m sspsam.cli …` runs the command line (as the `sspsam` script does)."""

from sspsam.cli.main import app

app()

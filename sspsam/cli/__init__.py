"""The `sspsam` command line, one module per command group; ``main`` holds the typer app. Importing
this package loads typer only: torch and the models load inside the command that runs."""


def __getattr__(name):  # `from sspsam.cli import app` (the console script's entry point) stays valid
    if name == "app":
        from sspsam.cli.main import app

        return app
    raise AttributeError(name)

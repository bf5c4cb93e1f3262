"""HTTP service and web page for sspsam (``pip install sspsam[serve]``; ``sspsam serve``)."""

from sspsam.serve.app import create_app

__all__ = ["create_app"]

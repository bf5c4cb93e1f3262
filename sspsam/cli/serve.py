"""`sspsam serve`: the HTTP API and web page (needs the serve extra: fastapi, uvicorn, python-multipart)."""

from __future__ import annotations

import typer

from sspsam.cli.common import DTYPE_HELP, check_speed_options, fail, say_dtype, say_warning
from sspsam.errors import CheckpointError, SSPSamError

DEFAULT_OVSS = "ovss-shapes-demo"


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 exposes it to the network."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port."),
    model: str = typer.Option("shapes-demo", "--model", "-m", help="Referring model: bundled name, variant, checkpoint or `sspsam export onnx` folder."),
    ovss_model: str = typer.Option(DEFAULT_OVSS, "--ovss-model", help="OVSS model for /v1/ovss; 'none' to run without."),
    device: str = typer.Option("auto", "--device", help="torch device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps."),
    queue_size: int = typer.Option(64, "--queue-size", min=1, help="Requests that may wait; beyond it: 503 + Retry-After."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Most queued requests the inference thread takes at once."),
    timeout_s: float = typer.Option(30.0, "--timeout", min=0.001, help="Seconds a request may wait for its answer (then 504)."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.001, help="Largest request body, MB (then 413)."),
    max_classes: int = typer.Option(256, "--max-classes", min=1, help="Most classes per /v1/ovss request."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's own log level (request logs are JSON lines)."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="Allow browser pages from this origin (repeatable); CORS is off without it."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.1, help="Seconds a client may take to send its request head."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", min=0.1, help="Seconds a request body may pause between chunks (then 408)."),
    max_connections: int = typer.Option(1000, "--max-connections", min=1, help="Open connections beyond which uvicorn answers 503."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Serve POST /v1/segment, POST /v1/ovss, the web page at / and the API docs at /docs.
    One process, one inference thread that micro-batches; run several behind a proxy to scale out."""
    try:
        import uvicorn

        from sspsam.serve.app import create_app, load_models
    except ImportError as exc:
        raise fail(f"`sspsam serve` needs the serve extra ({exc.name} is missing): pip install 'sspsam[serve]'") from None
    from sspsam.predict.device import resolve_device

    ovss = None
    try:  # load here, not in the server's start-up, so a bad model name is one clear line
        check_speed_options(None, "none", dtype)
        device = str(resolve_device(device))
        seg, _ = load_models(model, None, device, dtype)
        say_dtype(seg)
        if ovss_model.lower() not in ("", "none"):
            try:
                _, ovss = load_models(None, ovss_model, device, dtype)
            except CheckpointError as exc:
                if ovss_model != DEFAULT_OVSS:  # asked for by name: that is an error
                    raise
                say_warning(f"{exc}; serving without /v1/ovss")
    except (SSPSamError, ValueError) as exc:  # ValueError: a dtype this device cannot run
        raise fail(exc) from None
    app = create_app(model=model, ovss_model=None, device=device, max_upload_mb=max_upload_mb, timeout_s=timeout_s,
                     queue_size=queue_size, max_batch=max_batch, max_classes=max_classes, segmenter=seg, ovss=ovss,
                     body_timeout_s=body_timeout, cors_origins=cors_origin or None, dtype=dtype)
    typer.echo(f"sspsam serving {seg.name}" + (f" and {ovss.name}" if ovss else "") + f" on http://{host}:{port}/", err=True)
    from sspsam.serve.protocol import timed_h11

    uvicorn.run(app, host=host, port=port, access_log=False, log_level=log_level, http=timed_h11(header_timeout),
                timeout_keep_alive=5, limit_concurrency=max_connections)

"""`sspsam serve`: the HTTP API and web page (needs the serve extra: fastapi, uvicorn, python-multipart)."""

from __future__ import annotations

import typer

from sspsam.cli.common import (apply_quantize, check_speed_options, device_option, dtype_option, fail, go_offline,
                               model_dtype_args,
                               offline_option, quantize_option, say_dtype, say_warning, threads_option)
from sspsam.errors import CheckpointError, SSPSamError

DEFAULT_OVSS = "ovss-shapes-demo"


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 exposes it to the network."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port."),
    model: str = typer.Option("shapes-demo", "--model", "-m", help="Referring model: bundled name, variant, checkpoint or `sspsam export onnx` folder."),
    ovss_model: str = typer.Option(DEFAULT_OVSS, "--ovss-model", help="OVSS model for /v1/ovss; 'none' to run without."),
    device: str = device_option(),
    queue_size: int = typer.Option(64, "--queue-size", min=1, help="Requests that may wait; beyond it: 503 + Retry-After."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Most queued requests the inference thread takes at once."),
    timeout_s: float = typer.Option(30.0, "--timeout", min=0.001, help="Seconds a request may wait for its answer (then 504)."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.001, help="Largest request body, MB (then 413)."),
    max_classes: int = typer.Option(256, "--max-classes", min=1, help="Most classes per /v1/ovss request."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's own log level (request logs are JSON lines)."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="Allow browser pages from this origin (repeatable); CORS is off without it."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.1, help="Seconds a client may take to send its request head."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", min=0.1, help="Seconds a request body may pause between chunks (then 408)."),
    upload_timeout: float = typer.Option(120.0, "--upload-timeout", min=0.1, help="Seconds a whole request body may take to arrive (then 408)."),
    max_connections: int = typer.Option(1000, "--max-connections", min=1, help="Open connections beyond which uvicorn answers 503."),
    ray: bool = typer.Option(False, "--ray", help="Serve the same app as a Ray Serve deployment (needs sspsam[ray-serve])."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="With --ray: replicas, each with its models, worker and limits."),
    address: str = typer.Option("", "--address", help="With --ray: join this Ray cluster (e.g. auto, ray://host:10001); default: a local one."),
    autoscaling: str = typer.Option("", "--autoscaling", help="With --ray: Ray Serve autoscaling_config as JSON, e.g. "
                                    '\'{"min_replicas": 1, "max_replicas": 4}\' (replaces --replicas).'),
    replica_cpus: float = typer.Option(1.0, "--replica-cpus", min=0.0, help="With --ray: CPUs Ray reserves per replica."),
    threads: int = threads_option(" With --ray: per replica."),
    dtype: str = dtype_option(),
    offline: bool = offline_option(),
    quantize: str = quantize_option(),
) -> None:
    """Serve POST /v1/segment, POST /v1/ovss, the web page at / and the API docs at /docs.
    One process, one inference thread that micro-batches; run several behind a proxy to scale out."""
    try:
        import uvicorn

        from sspsam.serve.app import create_app, load_models
    except ImportError as exc:
        raise fail(f"`sspsam serve` needs the serve extra ({exc.name} is missing): pip install 'sspsam[serve]'") from None
    from sspsam.predict.device import resolve_device

    for flag, value in (("--model", model), ("--ovss-model", ovss_model)):
        if not value.strip():
            raise fail(f"{flag} is empty; give a model name or checkpoint path"
                       + (" ('none' serves without /v1/ovss)" if flag == "--ovss-model" else ""))
    go_offline(offline)  # the whole process (and a local Ray's replicas, which inherit it)
    if ray and quantize != "none":
        raise fail("--quantize is not available with --ray (each replica loads its own model in its dtype)")
    if ray:
        return _serve_ray(host, port, model, ovss_model, device, queue_size, max_batch, timeout_s, max_upload_mb,
                          max_classes, body_timeout, upload_timeout, cors_origin, replicas, address, autoscaling, replica_cpus,
                          threads, dtype)
    if address or autoscaling or replicas != 1:
        raise fail("--replicas, --address and --autoscaling need --ray")
    if threads:
        import torch

        torch.set_num_threads(threads)
    ovss = None
    sock = None
    try:  # cheap checks, then the port, then the models: a bad name or a busy port is one line, at once
        check_speed_options(threads, quantize, dtype)
        device = str(resolve_device(device))
        sock = bind_socket(host, port)
        seg, _ = load_models(model, None, device, model_dtype_args(dtype, quantize))
        apply_quantize(seg, quantize)
        say_dtype(seg)
        if ovss_model.lower() != "none":
            try:
                _, ovss = load_models(None, ovss_model, device, model_dtype_args(dtype, quantize))
                apply_quantize(ovss, quantize)
            except CheckpointError as exc:
                if ovss_model != DEFAULT_OVSS:  # asked for by name: that is an error
                    raise
                say_warning(f"{exc}; serving without /v1/ovss")
    except (SSPSamError, ValueError) as exc:  # ValueError: a dtype this device cannot run
        if sock is not None:
            sock.close()
        raise fail(exc) from None
    app = create_app(model=model, ovss_model=None, device=device, max_upload_mb=max_upload_mb, timeout_s=timeout_s,
                     queue_size=queue_size, max_batch=max_batch, max_classes=max_classes, segmenter=seg, ovss=ovss,
                     body_timeout_s=body_timeout, upload_timeout_s=upload_timeout, cors_origins=cors_origin or None,
                     dtype=dtype)
    typer.echo(f"sspsam serving {seg.name}" + (f" and {ovss.name}" if ovss else "") + f" on http://{host}:{port}/", err=True)
    from sspsam.serve.protocol import timed_h11

    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level=log_level, http=timed_h11(header_timeout),
                            timeout_keep_alive=5, limit_concurrency=max_connections)
    uvicorn.Server(config).run(sockets=[sock])


def _serve_ray(host, port, model, ovss_model, device, queue_size, max_batch, timeout_s, max_upload_mb, max_classes,
               body_timeout, upload_timeout, cors_origin, replicas, address, autoscaling, replica_cpus, threads,
               dtype="auto") -> None:
    """The app on Ray Serve. Model names are checked here (cheaply, without loading) so a typo is
    one line, not a replica crash loop; the replicas load the models."""
    import json

    from sspsam.predict.device import resolve_device

    try:
        auto = json.loads(autoscaling) if autoscaling else None
    except ValueError as exc:
        raise fail(f"--autoscaling is not JSON ({exc})") from None
    if auto is not None and not isinstance(auto, dict):
        raise fail("--autoscaling must be a JSON object (Ray Serve's autoscaling_config)")
    try:
        from sspsam.serve.ray_serve import require_serve, run

        require_serve()
        from sspsam.predict.ovss import OVSS
        from sspsam.predict.segmenter import Segmenter

        Segmenter.resolve(model)
        ovss = None if ovss_model.lower() == "none" else ovss_model
        if ovss is not None:
            try:
                OVSS.resolve(ovss)
            except CheckpointError as exc:
                if ovss != DEFAULT_OVSS:
                    raise
                say_warning(f"{exc}; serving without /v1/ovss")
                ovss = None
        device = str(resolve_device(device))
    except SSPSamError as exc:
        raise fail(exc) from None
    options = {"model": model, "ovss_model": ovss, "device": device, "max_upload_mb": max_upload_mb, "timeout_s": timeout_s,
               "queue_size": queue_size, "max_batch": max_batch, "max_classes": max_classes, "body_timeout_s": body_timeout,
               "upload_timeout_s": upload_timeout, "dtype": dtype,
               "cors_origins": cors_origin or None}
    what = f"{auto}" if auto else f"{replicas} replica{'s' * (replicas != 1)}"
    run(options, host, port, replicas, auto, address or None, replica_cpus, threads or None,
        started=lambda: typer.echo(f"sspsam serving {model} on Ray Serve ({what}) on http://{host}:{port}/", err=True))


def bind_socket(host: str, port: int):
    """The listening socket, bound before the models load: a busy port or a wrong address is
    reported in one line at once, not after a minute of loading (and nothing can take the port
    in between)."""
    import errno
    import socket

    if not 0 <= port <= 65535:
        raise SSPSamError(f"--port must be 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise SSPSamError(f"--host {host!r} is not an address here ({getattr(exc, 'strerror', None) or exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SSPSamError(f"port {port} on {host} is already in use (another server?); give another --port") from None
        raise SSPSamError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock

"""`sspsam export onnx MODEL -o DIR`: the model as ONNX graphs for ONNX Runtime (mounted by the main CLI).

torch and the exporter load inside the command, so `sspsam --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from sspsam.cli.common import check_output_dir, fail, offline_mode, offline_option
from sspsam.errors import SSPSamError

app = typer.Typer(
    help="Export a model to other runtimes (ONNX).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def load_for_export(model: str, random_init: bool = False):
    """(torch model, name, meta) for a model name `sspsam models` lists or a checkpoint path.

    Test configs (``*-tiny``) and, with ``random_init``, any config are built with random weights
    (for tests and benchmarks: such an export segments nothing useful); other names load their
    trained weights as `sspsam segment --model` does.
    """
    from sspsam.models.build import build_model
    from sspsam.config import list_configs, load_config
    from sspsam.models import registry
    from sspsam.predict.onnx import ExportError, exportable

    if model in list_configs():
        cfg = load_config(model)
        kind = registry.model_type(cfg)
        if kind not in exportable():
            raise ExportError(f"'{model}' is a '{kind}' model; ONNX export supports referring SSP-SAM models "
                              "(shapes-demo, ssp-sam-* configs, their checkpoints)")
        if random_init or model.endswith("-tiny"):
            cfg.setdefault("name", model)
            return build_model(cfg).eval(), model, {"weights": "random (not trained)"}
        import sspsam.io.weights as weights

        if model not in weights.REGISTRY:
            raise ExportError(f"'{model}' is an architecture without published trained weights: pass a checkpoint "
                              "path, or add --random-init for an untrained export (benchmarks, tests)")
    elif random_init:
        raise ExportError(f"--random-init needs a config name ({', '.join(list_configs())}), not '{model}'")
    from sspsam.predict.ovss import BUNDLED as OVSS_BUNDLED
    from sspsam.predict.segmenter import Segmenter

    if model in OVSS_BUNDLED:
        raise ExportError(f"'{model}' is an open-vocabulary (OVSS) model; ONNX export supports referring SSP-SAM "
                          "models so far (shapes-demo, ssp-sam-* configs, their checkpoints)")
    seg = Segmenter.from_pretrained(model, device="cpu")
    if not isinstance(seg, Segmenter) or registry.model_type(getattr(seg.model, "config", {})) not in exportable():
        raise ExportError(f"'{model}' is a training-free pipeline; ONNX export supports trained SSP-SAM models")
    return seg.model, seg.name, seg.meta


@app.command("onnx")
def onnx(
    model: str = typer.Argument(..., help="Bundled model (shapes-demo), config name (ssp-sam-tiny, …) or checkpoint path; see `sspsam models`."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the .onnx graphs and sspsam-onnx.json (created; files replaced)."),
    random_init: bool = typer.Option(False, "--random-init", help="Build a config with random weights (benchmarks, tests); useless for segmenting."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18 or newer: CLIP's antialiased resize needs it)."),
    offline: bool = offline_option(),
) -> None:
    """Write MODEL as three ONNX graphs (SAM image encoder, CLIP image tower, text + prompt + mask
    decoder with a dynamic number of phrases) and a manifest; run them with `sspsam.predict.onnx.OnnxSegmenter`."""
    try:
        if opset < 18:
            raise SSPSamError(f"--opset {opset} is too old: 18 or newer is needed (antialiased Resize)")
        check_output_dir(output, create=False)
        try:
            import onnx as _onnx  # noqa: F401 — the exporter needs it; say so in one line
        except ImportError:
            raise SSPSamError("the onnx package is not installed: pip install 'sspsam[onnx]'") from None
        from sspsam.predict.onnx import export_onnx

        with offline_mode(offline):
            net, name, meta = load_for_export(model, random_init)
        manifest = export_onnx(net, output, name=name, meta=meta, opset=opset)
    except (SSPSamError, OSError) as exc:
        raise fail(exc) from None
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"exported {manifest['model']} (opset {manifest['opset']}, {total / 1e6:.1f} MB)")
    for fname in [*manifest["files"], "sspsam-onnx.json"]:
        print(f"wrote {output / fname}")

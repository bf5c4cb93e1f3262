"""`sspsam evaluate MODEL --data ROOT`: the benchmarks' metrics, as the reference code computes them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sspsam.cli.common import (abort, apply_threads, check_output_dir, check_speed_options, device_option,
                               dtype_option, load_predictor, offline_mode, offline_option, quantize_option, threads_option)
from sspsam.errors import SSPSamError

def evaluate(
    model: str = typer.Argument(..., help="Checkpoint path (e.g. runs/x/model.pt), bundled model name, or variant with weights in the cache."),
    data: Path = typer.Option(..., "--data", help="Dataset root (refer / gRefCOCO / PhraseCut layout, or the official SSP-SAM root holding data_seg/anns and data/)."),
    dataset: str = typer.Option("refcoco", "--dataset", help="refcoco | refcoco+ | refcocog | grefcoco | phrasecut; OVSS: semseg | ade150 | ade847 | voc20 | voc21 | pc59 | pc459 | cocostuff171."),
    split: str = typer.Option("val", "--split", help="val | testA | testB | test (refer), val/testA/testB (gRefCOCO), val/test (PhraseCut)."),
    split_by: Optional[str] = typer.Option(None, "--split-by", help="refer split scheme: unc (RefCOCO/+), umd or google (RefCOCOg)."),
    output: Path = typer.Option(Path("eval"), "-o", "--output", help="Folder for metrics.json, table.md and pr_curve.png."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Stop after this many (image, sentence) samples."),
    device: str = device_option(),
    offline: bool = offline_option(),
    threads: Optional[int] = threads_option(),
    quantize: str = quantize_option(),
    dtype: str = dtype_option(),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="Referring: ssp-sam (the official SSP-SAM test.py: 512x512 mask frame, its mIoU/oIoU/Pr@X, data_seg/anns or refer layout; default: sspsam's protocol at the original size). OVSS: detectron2 (default, trained protocol) | mmseg (mmseg's metric) | sclip (SCLIP's whole inference protocol + mmseg's metric)."),
    slide: bool = typer.Option(False, "--slide/--no-slide", help="OVSS only: sliding-window inference (plus a global view)."),
    class_names: Optional[Path] = typer.Option(None, "--class-names", help="--protocol sclip: SCLIP class-name file, one class per line, synonyms split by ', '."),
    prob_thd: float = typer.Option(0.0, "--prob-thd", help="--protocol sclip: pixels whose best class probability is below this become class 0 (SCLIP: 0.1 with a background class)."),
    area_thd: Optional[float] = typer.Option(None, "--area-thd", help="--protocol sclip: drop non-background classes covering less than this fraction of the image."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override the model's inference settings: inference.key=value (repeatable; e.g. --set inference.mask_threshold=0.5)."),
) -> None:
    """Evaluate with the reference metrics: RES mIoU/oIoU/Pr@X, GRES gIoU/cIoU/N-acc/T-acc, PhraseCut, OVSS mIoU."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress

    import sspsam.engine.evaluate as ev
    from sspsam.predict.device import resolve_device
    from sspsam.predict.segmenter import Segmenter

    try:
        check_speed_options(threads, quantize, dtype)
        device = str(resolve_device(device))
        apply_threads(threads)
    except SSPSamError as exc:
        abort(exc)
    speed = (dtype, quantize)
    if dataset in ev.SEMSEG_DATASETS:
        sclip = {"class_names": class_names, "prob_thd": prob_thd, "area_thd": area_thd}
        return _evaluate_ovss(model, data, dataset, split, output, max_samples, device, protocol or "detectron2", slide, sclip, offline, overrides, speed)
    if protocol is not None:
        from sspsam.models.registry import OFFICIAL_PROTOCOL

        if protocol != OFFICIAL_PROTOCOL:
            abort(ValueError(f"unknown --protocol {protocol!r} for a referring dataset; use ssp-sam, or leave it out for sspsam's protocol"))
        return _evaluate_sspsam_protocol(model, data, dataset, split, split_by, output, max_samples, device, offline, overrides, speed)
    try:
        task = ev.task_of(dataset)
        check_output_dir(output, create=False)
        from sspsam.data.official_anns import OfficialAnnsDataset, is_official_layout

        # the data is checked before the model loads; the model's input size is set once it has
        if is_official_layout(data):  # the official SSP-SAM data_seg/anns files, scored with sspsam's protocol
            ds = OfficialAnnsDataset(data, dataset, split, 1024, split_by=split_by)
        else:
            ds = ev.open_dataset(dataset, data, split, 1024, split_by)
        with offline_mode(offline):
            seg = with_overrides(load_predictor(Segmenter, model, device, *speed), overrides)
        ds.image_size = int(seg.model.image_size)
        with Progress(console=Console(stderr=True), transient=True) as bar:
            job = bar.add_task(escape(f"{dataset} {split}"), total=len(ds) if max_samples is None else min(len(ds), max_samples))
            res = ev.evaluate(seg, ds, task, max_samples=max_samples, progress=lambda d, t: bar.update(job, completed=d))
        files = ev.write_report(output, res, task, dataset, split, seg.name)
    except SSPSamError as exc:
        abort(exc)
    print(ev.markdown_table(res["metrics"], task, dataset, split, seg.name), end="")
    print(f"{res['n']} samples in {res['seconds']:.1f} s")
    for f in files.values():
        print(f"wrote {f}")


def with_overrides(predictor, overrides: list[str] | None):
    """``--set inference.key=value`` on a loaded predictor: the model's config with the values set,
    validated like a file; only ``inference`` settings apply to a model already built."""
    if not overrides:
        return predictor
    from sspsam.config import apply_overrides
    from sspsam.errors import ConfigError
    from sspsam.models import registry

    for item in overrides:
        if not str(item).startswith("inference."):
            raise ConfigError(f"--set {item!r}: evaluate can change inference.* settings only (the model is built already)")
    cfg = apply_overrides(predictor.model.config, overrides)
    inf = registry.validate(cfg).inference
    predictor.model.config = cfg
    for key in ("mask_threshold", "no_target_min_pixels", "no_target_prob", "slide_above", "slide_max_scale"):
        if hasattr(predictor, key):
            setattr(predictor, key, getattr(inf, key))
    return predictor


def _evaluate_ovss(model, data, dataset, split, output, max_samples, device, protocol, slide, sclip=None, offline=False,
                   overrides=None, speed=("auto", "none")) -> None:
    import json

    from sspsam.io.checkpoint import atomic_write
    import sspsam.engine.evaluate as ev
    from sspsam.engine.evaluate_ovss import evaluate_ovss, format_iou_table
    from sspsam.predict.ovss import OVSS

    sclip = dict(sclip or {})
    try:
        if protocol not in ("detectron2", "mmseg", "sclip"):
            raise ValueError(f"unknown --protocol {protocol!r}; choose detectron2, mmseg or sclip")
        classes = None
        if (path := sclip.pop("class_names", None)) is not None:
            if protocol != "sclip":
                raise ValueError("--class-names is for --protocol sclip")
            from sspsam.models.zeroshot.sclip import read_class_names

            names, idx = read_class_names(path)
            classes = [", ".join(n for n, i in zip(names, idx) if i == k) for k in range(max(idx) + 1)]
        check_output_dir(output, create=False)
        ds = ev.open_semseg(dataset, data, split)  # the data is checked before the model loads
        with offline_mode(offline):
            ovss = with_overrides(load_predictor(OVSS, model, device, *speed), overrides)
        res = evaluate_ovss(ovss.model, ds, protocol=protocol, slide=slide, limit=max_samples, classes=classes,
                            sclip_options=sclip if protocol == "sclip" else None)
    except (SSPSamError, ValueError) as exc:
        abort(exc)
    output.mkdir(parents=True, exist_ok=True)
    table = format_iou_table(res)
    payload = {"model": ovss.name, "dataset": dataset, "split": split, "protocol": protocol, "slide": slide,
               "metrics": {k: v for k, v in res.items() if k != "per_class_iou"}}
    written = [
        atomic_write(output / "metrics.json", lambda p: Path(p).write_text(json.dumps(ev.json_safe(payload), indent=1, default=float))),
        atomic_write(output / "table.md", lambda p: Path(p).write_text(table + "\n")),
    ]
    print(f"{ovss.name} · {dataset} {split}: mIoU {100 * res['mIoU']:.2f}, pixel acc {100 * res['pACC']:.2f}")
    for w in written:
        print(f"wrote {w}")


def _evaluate_sspsam_protocol(model, data, dataset, split, split_by, output, max_samples, device, offline, overrides=None,
                              speed=("auto", "none")) -> None:
    """``--protocol ssp-sam``: the official test.py's numbers, on the official or the refer/ReLA layout."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress

    import sspsam.engine.evaluate_official as off
    from sspsam.data.official_anns import OfficialAnnsDataset, is_official_layout
    from sspsam.predict.segmenter import Segmenter

    try:
        if dataset not in off.DATASETS:
            raise ValueError(f"--protocol ssp-sam covers {', '.join(off.DATASETS)}, not {dataset!r}")
        with offline_mode(offline):
            seg = with_overrides(load_predictor(Segmenter, model, device, *speed), overrides)
        size = getattr(getattr(seg, "model", None), "image_size", 1024)
        if is_official_layout(data):
            layout = "official data_seg/anns"
            ds = OfficialAnnsDataset(data, dataset, split, size, split_by=split_by)
        elif dataset == "refclef":
            from sspsam.data.refer import RefCOCODataset

            layout = "refer"
            ds = RefCOCODataset(data, "refclef", split_by, split, size)
        else:
            import sspsam.engine.evaluate as ev

            layout = "refer" if dataset != "grefcoco" else "ReLA"
            ds = ev.open_dataset(dataset, data, split, size, split_by)
        with Progress(console=Console(stderr=True), transient=True) as bar:
            job = bar.add_task(escape(f"{dataset} {split}"), total=len(ds) if max_samples is None else min(len(ds), max_samples))
            res = off.evaluate_official(seg, ds, max_samples=max_samples, progress=lambda d, t: bar.update(job, completed=d))
        variant = getattr(seg.model, "config", {}).get("name")
        files = off.write_report(output, res, seg.name, dataset, split, layout, variant)
    except (SSPSamError, ValueError) as exc:
        abort(exc)
    print(off.markdown_table(res["metrics"], seg.name, dataset, split, variant), end="")
    print(f"{res['n']} samples ({layout} layout) in {res['seconds']:.1f} s")
    for f in files.values():
        print(f"wrote {f}")

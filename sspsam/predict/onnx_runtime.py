"""ONNX Runtime side of an `sspsam export onnx` folder: read and check its manifest, load its three
graphs behind the model interface :class:`sspsam.Segmenter` calls (``encode_image``,
``clip_input``, ``tokenize``, ``encode_text``, ``decode``).

Apart from :mod:`sspsam.predict.onnx` (the exporter and ``OnnxSegmenter``) so that
``Segmenter.from_pretrained(folder)`` can load an export without the predictor and the exporter
importing each other. The graphs and the manifest are described there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sspsam.errors import CheckpointError, SSPSamError
from sspsam.io.weights import sha256_file
from sspsam.predict.base import ONNX_MANIFEST as MANIFEST

FORMAT = "sspsam-onnx"
FORMAT_VERSION = 1
def exportable() -> tuple[str, ...]:
    """The config ``model`` types that export (and that an export folder may hold): the registry's."""
    from sspsam.models import registry

    return tuple(m.name for m in registry.methods() if m.exportable)


def read_manifest(path: str | os.PathLike, verify: bool = True) -> dict:
    """The manifest of an export folder, after checking each file's size (and sha256 with ``verify``)."""
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{folder} is not an sspsam ONNX export: no {MANIFEST} (make one with `sspsam export onnx MODEL -o {folder}`)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an sspsam ONNX manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file} has format version {manifest.get('format_version')}; this sspsam reads {FORMAT_VERSION}")
    for fname, info in manifest.get("files", {}).items():
        p = folder / fname
        if not p.is_file() or p.stat().st_size != info.get("bytes"):
            raise CheckpointError(f"{p} is missing or has the wrong size; export again")
        if verify and sha256_file(p) != info.get("sha256"):
            raise CheckpointError(f"{p} does not match the sha256 in {MANIFEST}; export again")
    return manifest


def _ort():
    """onnxruntime, or a one-line error naming the extra that installs it (never an ImportError traceback)."""
    try:
        import onnxruntime
    except ImportError:
        raise SSPSamError("onnxruntime is not installed: pip install 'sspsam[onnx]'") from None
    return onnxruntime


def default_providers() -> list[str]:
    """CUDA first where this onnxruntime has it, then the CPU."""
    have = _ort().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def device_providers(device) -> list[str]:
    """The providers for a torch-style device: 'auto' = :func:`default_providers`, 'cpu' = the CPU
    only, 'cuda[:N]' = CUDA (an error where this onnxruntime has none) then the CPU."""
    name = str(device).strip().lower()
    if name in ("", "auto"):
        return default_providers()
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name.startswith("cuda"):
        if "CUDAExecutionProvider" not in _ort().get_available_providers():
            raise SSPSamError(f"device {device!r}: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu), "
                              "or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise SSPSamError(f"device {device!r}: an ONNX export runs on cpu or cuda")


def default_session_options():
    """One session's threads = torch's (what ``--threads`` / ``torch.set_num_threads`` chose), so
    the ONNX path and the PyTorch path are sized alike; the graphs run one after another, so one
    inter-op thread. No spinning: ORT's threads otherwise busy-wait after each run and take the
    cores from the torch pre/post-processing that follows (and from anything else in the process:
    in benchmarks/batch_throughput.py, PyTorch calls right after an ORT call ran at 15 instead of
    ~35 images/s)."""
    opts = _ort().SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OnnxGraphs(nn.Module):
    """The exported graphs behind the interface :class:`sspsam.Segmenter` calls on its model
    (``encode_image``, ``clip_input``, ``tokenize``, ``encode_text``, ``decode``). An ``nn.Module``
    without parameters only so that ``.to()``/``.eval()`` work; tensors in and out are CPU torch."""

    def __init__(self, folder: Path, manifest: dict, providers: list[str] | None = None,
                 session_options=None):
        super().__init__()
        ort = _ort()
        from sspsam.backbones._imports import open_clip_modules

        self.manifest = manifest
        self.config = dict(manifest.get("config") or {})
        self.providers = list(providers or default_providers())
        self.sessions = {}
        for key, graph in manifest["graphs"].items():
            try:
                self.sessions[key] = ort.InferenceSession(str(folder / graph["file"]),
                                                          sess_options=session_options or default_session_options(),
                                                          providers=self.providers)
            except Exception as exc:  # noqa: BLE001 — onnxruntime raises its own exception types
                raise CheckpointError(f"onnxruntime cannot load {folder / graph['file']}: {str(exc).splitlines()[0][:200]}") from None
        self.tokenizer = open_clip_modules()[1].SimpleTokenizer(context_length=int(manifest["context_length"]))

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    def _run(self, key: str, **inputs) -> list[np.ndarray]:
        sess = self.sessions[key]
        feed = {i.name: inputs[i.name].detach().cpu().numpy() for i in sess.get_inputs()}
        return sess.run(None, feed)

    def encode_image(self, images: torch.Tensor, valid_hw: torch.Tensor | None = None,
                     clip_images: torch.Tensor | None = None):
        from sspsam.models.ssp_sam.model import ImageFeatures
        from sspsam.models.ssp_sam.official_inputs import clip_input_from_letterbox

        if valid_hw is None:
            valid_hw = torch.full((images.shape[0], 2), self.image_size)
        if self.manifest["clip_input"] == "centered":
            if clip_images is None:
                clip_images = clip_input_from_letterbox(images, valid_hw, int(self.manifest["clip_image_size"]))
        else:
            clip_images = images
        (sam,) = self._run("sam_image", images=images.float(), valid_hw=valid_hw.long())
        patches, glob = self._run("clip_image", clip_images=clip_images.float())
        return ImageFeatures(sam=torch.from_numpy(sam), clip_patches=torch.from_numpy(patches),
                             clip_global=torch.from_numpy(glob))

    def clip_input(self, rgbs: list, device="cpu"):
        if self.manifest["clip_input"] != "centered":
            return None
        from sspsam.models.ssp_sam.official_inputs import clip_input

        return torch.stack([clip_input(rgb, int(self.manifest["clip_image_size"])) for rgb in rgbs])

    def tokenize(self, phrases: list[str]) -> torch.Tensor:
        if self.manifest.get("phrase_format") == "official":
            from sspsam.models.ssp_sam.official_inputs import format_phrase

            phrases = [format_phrase(p) for p in phrases]
        return self.tokenizer(phrases)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens  # the text tower is inside the decoder graph

    def decode(self, image, tokens: torch.Tensor, image_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Phrase t against image ``image_index[t]`` (default: image 0 for all)."""
        if image_index is None:
            image_index = torch.zeros(len(tokens), dtype=torch.long)
        names = self.manifest["graphs"]["decoder"]["outputs"]
        parts = []
        for b in image_index.unique(sorted=True).tolist():
            sel = (image_index == b).nonzero(as_tuple=True)[0]
            outs = self._run("decoder", tokens=tokens[sel].long(), sam_features=image.sam[b : b + 1],
                             clip_patches=image.clip_patches[b : b + 1], clip_global=image.clip_global[b : b + 1])
            parts.append((sel, outs))
        result = {}
        for i, n in enumerate(names):
            first = parts[0][1][i]
            full = torch.empty((len(tokens), *first.shape[1:]), dtype=torch.float32)
            for sel, outs in parts:
                full[sel] = torch.from_numpy(outs[i])
            result[n] = full
        return result


def load_graphs(path: str | os.PathLike, verify: bool = True, providers: list[str] | None = None,
                session_options=None, device=None) -> OnnxGraphs:
    """An export folder's graphs, ready to run. ``verify`` re-hashes every file against the
    manifest first; ``device`` ('auto', 'cpu', 'cuda') picks the providers when ``providers`` is
    not given; ``session_options`` default to :func:`default_session_options`."""
    folder = Path(path)
    manifest = read_manifest(folder, verify)
    if manifest.get("model_type") not in exportable():
        raise CheckpointError(f"{folder} holds a '{manifest.get('model_type')}' export; sspsam runs exports of "
                              f"{', '.join(exportable())} models")
    if providers is None and device is not None:
        providers = device_providers(device)
    return OnnxGraphs(folder, manifest, providers, session_options)


"""ONNX export of SSP-SAM and an ONNX Runtime runner with the same results as :class:`sspsam.Segmenter`.

Three graphs, cut where the predictor already caches: an image is encoded once and every phrase
is decoded against its features, so the export keeps that split rather than one graph per
(image, phrases) call.

* ``sam_image_encoder.onnx``: letterboxed image [B,3,S,S] (float 0..255) + content size [B,2]
  → SAM's image embedding [B,C,S/16,S/16];
* ``clip_image_encoder.onnx``: the CLIP input (the same letterbox, or the official centred
  canvas already normalised — see the manifest's ``clip_input``) → CLIP-Surgery patch tokens
  [B,N,E] and CLIP's global token [B,E];
* ``text_prompt_decoder.onnx``: token ids [T,L] (T phrases, a dynamic axis) + one image's
  features → SAM low-res mask logits [T,1,4h,4w], IoU [T] and, with that head, the no-target
  logit [T].

``sspsam-onnx.json`` (the manifest) names the model, input sizes, opset, tokenizer and context
length, the config the runner needs (thresholds, phrase format) and the sha256 of every file.

The runner (:mod:`sspsam.predict.onnx_runtime`) plugs the graphs into :class:`sspsam.Segmenter` in
place of the torch model, so the letterbox, tokenisation and post-processing (thresholds,
no-target rule, un-letterboxing) are the predictor's own code, not a copy that could drift; an
export folder is therefore also a model name (``Segmenter.from_pretrained(folder)``, ``-m folder``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from sspsam.errors import SSPSamError
from sspsam.io.weights import sha256_file
from sspsam.predict.onnx_runtime import (  # noqa: F401 — the runtime side, re-exported for old imports
    FORMAT, FORMAT_VERSION, MANIFEST, OnnxGraphs, default_providers, default_session_options,
    device_providers, exportable, load_graphs, read_manifest,
)

OPSET = 18  # the first opset whose Resize has `antialias` (CLIP's resize of the letterbox)
GRAPHS = {
    "sam_image": "sam_image_encoder.onnx",
    "clip_image": "clip_image_encoder.onnx",
    "decoder": "text_prompt_decoder.onnx",
}


class ExportError(SSPSamError):
    """The model cannot be exported (a kind without ONNX support, or the exporter failed)."""


# ---- export-friendly equivalents ---------------------------------------------------------------
class PackFreeLinguisticAdapter(nn.Module):
    """The legacy Linguistic Attention Adapter without ``pack_padded_sequence``, which torch.export
    cannot trace (the packed batch sizes are data). Same weights, same numbers: the forward
    direction of a GRU never sees later padding anyway; the backward direction runs as a forward
    GRU over each phrase reversed *within its length* (a gather), and is gathered back — exactly
    what packing gives, padding positions zeroed as ``pad_packed_sequence`` does.
    """

    def __init__(self, adapter: nn.Module):
        super().__init__()
        gru = adapter.gru
        if not (gru.bidirectional and gru.num_layers == 1 and gru.batch_first):
            raise ExportError("the legacy linguistic adapter is expected to hold one bidirectional batch-first GRU layer")
        self.word_proj, self.phrase_attention = adapter.word_proj, adapter.phrase_attention
        self.fwd = nn.GRU(gru.input_size, gru.hidden_size, batch_first=True)
        self.bwd = nn.GRU(gru.input_size, gru.hidden_size, batch_first=True)
        with torch.no_grad():
            for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
                getattr(self.fwd, name).copy_(getattr(gru, name))
                getattr(self.bwd, name).copy_(getattr(gru, name + "_reverse"))

    def forward(self, words: torch.Tensor, pad_mask: torch.Tensor):
        w = self.word_proj(words)
        length = (~pad_mask).sum(1, keepdim=True).clamp(min=1)  # [T,1]
        pos = torch.arange(w.shape[1], device=w.device)[None]  # [1,L]
        inside = pos < length
        rev = torch.where(inside, length - 1 - pos, pos)  # its own inverse
        index = rev.unsqueeze(-1).expand(-1, -1, w.shape[2])
        back = self.bwd(torch.gather(w, 1, index))[0]
        h = torch.cat([self.fwd(w)[0], torch.gather(back, 1, index)], dim=-1) * inside.unsqueeze(-1).to(w.dtype)
        logits = self.phrase_attention(h).squeeze(-1).masked_fill(pad_mask, float("-inf"))
        weights = logits.softmax(dim=-1)
        return torch.einsum("tl,tld->td", weights, w), w, weights


def export_friendly(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the modules torch.export cannot trace swapped for equivalents."""
    import copy

    model = copy.deepcopy(model).float().eval()
    adapter = model.ssp_encoder.linguistic_adapter
    if not adapter.official:
        model.ssp_encoder.linguistic_adapter = PackFreeLinguisticAdapter(adapter)
    return model


class _SamImage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.sam = model.sam

    def forward(self, images, valid_hw):
        return self.sam.encode_image(images, valid_hw)


class _ClipImage(nn.Module):
    def __init__(self, model, normalized: bool):
        super().__init__()
        self.model, self.normalized = model, normalized

    def forward(self, images):
        return self.model.encode_clip(images, self.normalized)


class _Decoder(nn.Module):
    """Tokens of T phrases + one image's features → what ``SSPSAM.decode`` gives for image 0."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, sam, clip_patches, clip_global):
        # SSPSAM.decode for one image, without its per-image loop (``unique().tolist()`` is data
        # that torch.export cannot trace); the parity test holds the two together.
        m, t = self.model, tokens.shape[0]
        out = m.ssp_encoder(clip_patches.expand(t, -1, -1), m.encode_text(tokens), cls=clip_global.expand(t, -1))
        logits, iou = m.sam.decode(sam, out["prompts"])
        if m.no_target_head is None:
            return logits, iou[:, 0]
        return logits, iou[:, 0], m.no_target_head(out["box_token"], logits)


# ---- export ------------------------------------------------------------------------------------
def _upsample_bilinear_aa(g, x, output_size, align_corners, scale_factors):
    """``F.interpolate(..., mode="bilinear", antialias=True)`` (how CLIP shrinks SAM's letterbox) as
    ONNX ``Resize`` with ``antialias=1`` (opset 18), which the TorchScript exporter lacks. Both
    follow PIL's antialiased filter; ``exclude_outside=1`` renormalises the border weights as torch
    does (without it the edge rows differ by ~13 grey levels). Max diff ~1e-3 on 0..255 inputs."""
    from torch.onnx import symbolic_helper as sh

    if sh._maybe_get_const(align_corners, "b"):
        raise ExportError("an antialiased resize with align_corners=True has no ONNX equivalent")
    size = sh._maybe_get_const(output_size, "is")
    if sh._is_value(size) or size is None:
        raise ExportError("an antialiased resize to a size only known at run time cannot be exported")
    shape = g.op("Shape", x)
    lead = g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([0])), g.op("Constant", value_t=torch.tensor([2])))
    sizes = g.op("Concat", lead, g.op("Constant", value_t=torch.tensor(list(size), dtype=torch.long)), axis_i=0)
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op("Resize", x, empty, empty, sizes, mode_s="linear", coordinate_transformation_mode_s="half_pixel",
                antialias_i=1, exclude_outside_i=1)


def _export_graph(module, args, path: Path, inputs, outputs, dynamic: dict, opset: int) -> None:
    """TorchScript exporter: the dynamo one exports these graphs too, but takes ~20x longer (95 s
    against 5 s for the tiny model on a loaded 2-core machine), too slow for a test to run."""
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bilinear2d_aa", _upsample_bilinear_aa, opset)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX symbolic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's business
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 — the exporter's errors can be pages long
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise ExportError(f"torch.onnx.export failed for {path.name}: {type(exc).__name__}: {first[:300]}") from None
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


def export_onnx(model, out_dir: str | os.PathLike, name: str | None = None, meta: dict | None = None,
                opset: int = OPSET) -> dict:
    """Write the three graphs and the manifest of an SSP-SAM ``model`` into ``out_dir``; returns the manifest.

    The files are written into a temporary folder beside ``out_dir`` and moved into place only
    when every graph exported, manifest last, so a failed or interrupted export leaves no
    half-written graph under the manifest's names.
    """
    config = dict(getattr(model, "config", {}) or {})
    from sspsam.models import registry

    kind = registry.model_type(config)
    if kind not in exportable():
        raise ExportError(f"ONNX export supports {', '.join(exportable())} models; this one is '{kind}'")
    if getattr(model.sam, "image_encoder", None) is None:
        raise ExportError("this model was built without SAM's image encoder; nothing to export for the image side")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output {out_dir} exists and is not a folder; give -o a folder")
    m = export_friendly(model)
    s, c = m.image_size, m.clip.image_size
    centered = m.clip_geometry == "centered"
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, s, s, generator=gen) * 255
    valid = torch.tensor([[s, s], [s, s * 3 // 4]])
    clip_x = torch.randn(2, 3, c, c, generator=gen) if centered else images
    tokens = m.tokenize(["a phrase", "another, longer phrase to read", "x"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name[:100]}.", suffix=".tmp", dir=out_dir.parent))
    try:
        with torch.no_grad():
            feats = m.encode_image(images[:1], valid[:1], clip_images=clip_x[:1] if centered else None)
            _export_graph(_SamImage(m), (images, valid), tmp / GRAPHS["sam_image"], ["images", "valid_hw"],
                          ["sam_features"], {"images": {0: "B"}, "valid_hw": {0: "B"}, "sam_features": {0: "B"}}, opset)
            _export_graph(_ClipImage(m, centered), (clip_x,), tmp / GRAPHS["clip_image"], ["clip_images"],
                          ["clip_patches", "clip_global"], {"clip_images": {0: "B"}, "clip_patches": {0: "B"},
                                                             "clip_global": {0: "B"}}, opset)
            outputs = ["mask_logits", "iou"] + (["no_target_logit"] if m.no_target_head is not None else [])
            _export_graph(_Decoder(m), (tokens, feats.sam, feats.clip_patches, feats.clip_global),
                          tmp / GRAPHS["decoder"], ["tokens", "sam_features", "clip_patches", "clip_global"], outputs,
                          {n: {0: "T"} for n in ["tokens", *outputs]}, opset)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": name or config.get("name", kind),
            "model_type": kind,
            "opset": opset,
            "image_size": s,
            "clip_image_size": c,
            "clip_input": "centered" if centered else "letterbox",
            "context_length": int(m.clip.context_length),
            "tokenizer": "open_clip SimpleTokenizer (CLIP BPE, 49408 tokens)",
            "phrase_format": m.phrase_format,
            "graphs": {
                "sam_image": {"file": GRAPHS["sam_image"], "inputs": {"images": ["B", 3, s, s], "valid_hw": ["B", 2]},
                              "outputs": {"sam_features": list(feats.sam.shape[1:])}},
                "clip_image": {"file": GRAPHS["clip_image"],
                               "inputs": {"clip_images": ["B", 3, c, c] if centered else ["B", 3, s, s]},
                               "outputs": {"clip_patches": ["B", *feats.clip_patches.shape[1:]],
                                           "clip_global": ["B", *feats.clip_global.shape[1:]]}},
                "decoder": {"file": GRAPHS["decoder"], "inputs": {"tokens": ["T", int(m.clip.context_length)]},
                            "outputs": outputs},
            },
            "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())},
            "config": config,
            "meta": json.loads(json.dumps(meta or {}, default=str)),
            "torch": torch.__version__,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """A new folder: one rename. An existing one (a re-export): each file replaced, manifest last."""
    if not out_dir.exists():
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; an output folder gets the usual permissions
        try:
            os.replace(tmp, out_dir)
            return
        except OSError:
            pass  # created meanwhile: replace file by file
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # no manifest naming a mix of old and new graphs
    for p in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(p, out_dir / p.name)


class OnnxSegmenter:
    """:class:`sspsam.Segmenter` on ONNX Runtime: same inputs, same :class:`Segmentation` out.

    ``OnnxSegmenter.from_dir(DIR)`` loads what `sspsam export onnx` wrote; ``providers`` default
    to CUDA (when this onnxruntime has it) then CPU. torch is still needed: the letterbox,
    tokenisation and post-processing are the predictor's torch code; the networks are not.
    """

    def __init__(self, graphs: OnnxGraphs):
        from sspsam.predict.segmenter import Segmenter

        self.graphs = graphs
        self.manifest = graphs.manifest
        self.segmenter = Segmenter(graphs, device="cpu", name=self.manifest["model"], meta=self.manifest.get("meta"))

    @classmethod
    def from_dir(cls, path: str | os.PathLike, providers: list[str] | None = None, verify: bool = True,
                 session_options=None, device=None) -> "OnnxSegmenter":
        """Load an export folder (see :func:`sspsam.predict.onnx_runtime.load_graphs`)."""
        return cls(load_graphs(path, verify, providers, session_options, device))

    @property
    def name(self) -> str:
        return self.segmenter.name

    @property
    def providers(self) -> list[str]:
        return self.graphs.providers

    def set_image(self, image, *args, **kwargs):
        """As :meth:`sspsam.Segmenter.set_image`: the two image graphs run once per image."""
        return self.segmenter.set_image(image, *args, **kwargs)

    def segment(self, image, text_or_texts, *args, **kwargs):
        """As :meth:`sspsam.Segmenter.segment`; returns a :class:`sspsam.Segmentation`."""
        return self.segmenter.segment(image, text_or_texts, *args, **kwargs)

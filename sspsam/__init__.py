"""sspsam: language-guided segmentation with SAM and CLIP (SSP-SAM for RES/GRES; ESC-Net, SAM-MI and a training-free path for open-vocabulary semantic segmentation).

Layout (dependencies point down; see ARCHITECTURE.md): ``cli``, ``serve`` → ``predict``, ``engine``
→ ``models`` → ``backbones``; ``data``, ``io``, ``config`` and ``errors`` are leaves any layer uses.
"""

from sspsam.errors import CheckpointError, ConfigError, ImageLoadError, SSPSamError, TextError

__version__ = "0.1.0"
__all__ = ["Segmenter", "Segmentation", "Instances", "coco_results", "OVSS", "SemanticSegmentation", "build_model", "load_config", "SSPSamError", "CheckpointError",
           "ConfigError", "ImageLoadError", "TextError", "__version__"]


def __getattr__(name):  # keep `import sspsam` light: torch-heavy parts load on first use
    if name == "Segmenter":
        from sspsam.predict.segmenter import Segmenter

        return Segmenter
    if name in ("Segmentation", "Instances", "coco_results"):
        import sspsam.predict.results as results

        return getattr(results, name)
    if name in ("OVSS", "SemanticSegmentation"):
        import sspsam.predict.ovss as ovss_predictor

        return getattr(ovss_predictor, name)
    if name == "build_model":
        from sspsam.models.build import build_model

        return build_model
    if name == "onnx":  # sspsam.onnx.export_onnx / OnnxSegmenter: the ONNX export and its runtime under a short name
        import sspsam.predict.onnx as onnx

        return onnx
    if name == "load_config":
        from sspsam.config import load_config

        return load_config
    raise AttributeError(name)

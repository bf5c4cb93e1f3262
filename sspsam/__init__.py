"""sspsam: language-guided segmentation with SAM and CLIP (SSP-SAM for RES/GRES; ESC-Net, SAM-MI and a training-free path for open-vocabulary semantic segmentation)."""

from .errors import CheckpointError, ConfigError, ImageLoadError, SSPSamError, TextError

__version__ = "0.1.0"
__all__ = ["Segmenter", "Segmentation", "Instances", "coco_results", "OVSS", "SemanticSegmentation", "build_model", "load_config", "SSPSamError", "CheckpointError",
           "ConfigError", "ImageLoadError", "TextError", "__version__"]


def __getattr__(name):  # keep `import sspsam` light: torch-heavy parts load on first use
    if name in ("Segmenter", "Segmentation", "Instances", "coco_results"):
        from . import predictor

        return getattr(predictor, name)
    if name in ("OVSS", "SemanticSegmentation"):
        from .ovss import predictor as ovss_predictor

        return getattr(ovss_predictor, name)
    if name in ("build_model", "load_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(name)

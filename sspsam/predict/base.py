"""The ``Predictor`` base of ``Segmenter`` and ``OVSS``: device, model-name resolution (bundled
demos, published variants, checkpoint paths), the demo-domain warning and the checks every
predictor makes on its outputs."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from sspsam.config import list_configs, load_config
from sspsam.errors import CheckpointError, ConfigError, ModelOutputError, TextError
from sspsam.io.images import is_tensor
from sspsam.models import registry
from sspsam.models.build import model_and_meta

#: the manifest that marks a folder as an `sspsam export onnx` export (sspsam.predict.onnx.MANIFEST;
#: named here so that resolving a name never imports the exporter)
ONNX_MANIFEST = "sspsam-onnx.json"
#: the demo models shipped inside the package, by task
REFERRING_BUNDLED = {"shapes-demo": "assets/shapes-demo.pt"}
OVSS_BUNDLED = {"ovss-shapes-demo": "assets/ovss-shapes-demo.pt"}


class Predictor:
    """What every public predictor owns, so ``Segmenter`` and ``OVSS`` resolve names, pick devices,
    describe their domain and drop stale caches the same way.

    A subclass sets ``BUNDLED`` (its demo models), ``COMMAND`` (the command it serves: the methods
    it runs are the registry's entries with that command, see :meth:`model_types`) and ``TASK``, and implements ``clear_cache`` (its cached image/text features) and
    ``segment``. Name resolution, in order: a bundled demo, a training-free ``zeroshot`` config, an
    ONNX export folder (where ``RUNTIMES`` allows it), a checkpoint path, a published variant
    (downloaded on first use), ``hf-hub:OWNER/REPO[/PATH][@REVISION]`` (:mod:`sspsam.io.hub`);
    anything else is an error listing what would work.
    """

    BUNDLED: dict[str, str] = {}
    #: 'segment' or 'ovss': ``sspsam.models.registry.Method.commands`` says which methods run here
    COMMAND = ""
    #: other runtimes than PyTorch this predictor can load ('onnx': an `sspsam export onnx` folder)
    RUNTIMES: tuple[str, ...] = ()
    TASK = ""
    #: the modules ``compile=True`` wraps with torch.compile: the image towers, where the time goes
    HOT_MODULES: tuple[str, ...] = ()

    def _place(self, model, device, dtype) -> None:
        """Put ``model`` on ``device`` in ``dtype`` (see :mod:`sspsam.predict.precision`): sets
        ``self.device``, ``self.dtype``, ``self.dtype_reason`` and ``self.model`` (in eval mode).

        ``"auto"`` leaves weights a caller already made half (``model.half()``) as they are, as
        ``None`` does: the automatic choice is for fp32 checkpoints, not an override of a choice
        the caller made in code."""
        from sspsam.predict.device import resolve_device
        from sspsam.predict.precision import AUTO, apply_dtype, check_dtype, log_choice_once, model_dtype, resolve_auto

        self.device = resolve_device(device)
        is_auto = isinstance(dtype, str) and dtype.lower() == AUTO
        if is_auto and (not isinstance(model, torch.nn.Module) or model_dtype(model) != torch.float32):
            dtype = None  # an ONNX export (fp32 graphs on ONNX Runtime) or weights halved by hand
        try:
            picked, self.dtype_reason = resolve_auto(dtype, self.device)
        except ValueError as exc:
            if is_auto:  # a bad $SSPSAM_DTYPE: the user's setting, not a caller's bug
                raise ConfigError(str(exc)) from None
            raise
        self.dtype = torch.float32 if picked is None else picked
        check_dtype(self.device, self.dtype)
        model = model.to(self.device)
        if picked is not None and not (is_auto and picked == torch.float32):
            model = apply_dtype(model, picked)
        self.model = model.eval()
        self.compiled: list[str] = []
        if is_auto:
            log_choice_once(self.dtype, self.dtype_reason)

    @property
    def dtype_name(self) -> str:
        """The dtype the model runs in, as outputs' metadata names it ('float32', 'bfloat16', …)."""
        from sspsam.predict.precision import dtype_name

        return dtype_name(self._run_dtype())

    def _run_dtype(self) -> torch.dtype:
        """The dtype to autocast to: the one asked for, or what the weights hold (``model.half()``)."""
        from sspsam.predict.precision import model_dtype

        return self.dtype if self.dtype != torch.float32 else model_dtype(self.model)

    def _autocast(self):
        from sspsam.predict.precision import autocast

        return autocast(self.device, self._run_dtype())

    def _compile(self) -> None:
        """``compile=True``: wrap HOT_MODULES and warm up once (compile is lazy). Wherever the
        compiler fails, at the warm-up or at a later call with a new batch size, every module runs
        eagerly again from then on, with one warning, and that call is answered eagerly."""
        from sspsam.predict.precision import compile_hot_modules

        self.compiled = compile_hot_modules(self.model, list(self.HOT_MODULES), on_failure=self._compile_failed)
        if self.compiled:
            self._warm_up()
            self.clear_cache()

    def _compile_failed(self, exc: BaseException) -> None:
        import warnings

        from sspsam.predict.precision import uncompile

        if not self.compiled:
            return
        uncompile(self.model, self.compiled)
        self.compiled = []
        warnings.warn(f"torch.compile did not work for this model ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                      "running eagerly", stacklevel=2)

    def _warm_up(self) -> None:
        """One small call through every compiled module."""
        raise NotImplementedError

    def _identify(self, model, name: str | None, meta: dict | None, default: str) -> None:
        self.name = name or model.config.get("name", default)
        self.meta = dict(meta or {})  # the checkpoint's "meta" entry (training data, domain, …)
        self.domain = model_domain(self.name, self.meta)
        from sspsam.predict.vocabulary import Vocabulary

        self.vocabulary = Vocabulary.from_meta(self.meta)  # None: an open-vocabulary model, nothing to check

    def to(self, device: str | torch.device):
        """Move the model to ``device`` ('auto', 'cpu', 'cuda:1', …) and drop the cached features
        (they live on the old device); returns self."""
        from sspsam.predict.device import resolve_device

        self.device = resolve_device(device)
        self._check_device()
        self.model.to(self.device)
        self.clear_cache()
        return self

    def _check_device(self) -> None:
        """Refuse a device the predictor's settings cannot run on (e.g. fp16 on a CPU)."""
        from sspsam.predict.precision import check_dtype

        check_dtype(self.device, self.dtype)

    def clear_cache(self) -> None:
        raise NotImplementedError

    @classmethod
    def model_types(cls) -> tuple[str, ...]:
        """The config ``model`` types this predictor runs (from the method registry)."""
        return registry.running_under(cls.COMMAND)

    @classmethod
    def resolve(cls, name_or_path: str | Path) -> tuple[str, Path | None, str]:
        """``(kind, checkpoint path, display name)``; kind is 'checkpoint', 'training-free' (a
        training-free method's config: no file, CLIP and SAM come from the weights cache) or 'onnx' (a folder `sspsam export onnx` wrote)."""
        name = str(name_or_path)
        if name.startswith("hf-hub:"):  # a checkpoint on the Hugging Face Hub (downloaded once into its cache)
            from sspsam.io.hub import download, parse

            return "checkpoint", download(name), str(parse(name))
        if name in cls.BUNDLED:
            path = Path(str(resources.files("sspsam") / cls.BUNDLED[name]))
            if not path.is_file():
                raise CheckpointError(f"bundled model '{name}' is not in this install ({path} missing); "
                                      "use 'zeroshot' or a checkpoint path")
            return "checkpoint", path, name
        configs = list_configs()
        method = registry.for_config(load_config(name)) if name in configs else None
        if method is not None and method.training_free:
            return "training-free", None, name
        path = Path(name)
        if path.is_dir() and (path / ONNX_MANIFEST).is_file():
            if "onnx" not in cls.RUNTIMES:
                raise CheckpointError(f"{path} is an ONNX export of a referring model: use it with `sspsam segment` / Segmenter")
            return "onnx", path, path.name
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder, not a checkpoint file"
                                  + (f" or an ONNX export (no {ONNX_MANIFEST} in it)" if "onnx" in cls.RUNTIMES else ""))
        if path.suffix or path.exists():
            return "checkpoint", path, path.stem
        if method is not None:
            if cls.COMMAND not in method.commands:
                raise CheckpointError(f"'{name}' is a '{method.name}' model, not {cls.TASK} model; {cls._other_command()}")
            return "checkpoint", variant_checkpoint(name), name
        raise CheckpointError(cls._unknown(name, configs) + _did_you_mean(name, [*cls.BUNDLED, *configs]))

    @classmethod
    def _from_checkpoint(cls, path: Path, device, name: str, **opts):
        """The predictor for a checkpoint file; a model of another task is refused before it is built."""
        model, meta = model_and_meta(path, cls.COMMAND)
        return cls(model, device, name, meta, **opts)

    @classmethod
    def _other_command(cls) -> str:
        return ""

    @classmethod
    def _unknown(cls, name: str, configs: list[str]) -> str:
        raise NotImplementedError


def model_domain(name: str | None, meta: dict | None) -> str | None:
    """The data a model knows, from its checkpoint meta; the bundled demos are generated shapes."""
    from sspsam.predict.domain import DOMAIN

    domain = (meta or {}).get("domain")
    if domain is None and name in ("shapes-demo", "ovss-shapes-demo"):
        return DOMAIN
    return domain if isinstance(domain, str) else None


def _did_you_mean(name: str, known: list[str]) -> str:
    """'; did you mean shapes-demo?' for a near miss (a typo in -m), else ''."""
    import difflib

    close = difflib.get_close_matches(name.lower(), known, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def model_warnings(name: str, model) -> list[str]:
    """A model built with random weights (a test config such as ``zeroshot-tiny`` names no CLIP or
    SAM weights) answers every phrase with noise that looks like a mask: say so on every answer."""
    parts = list(getattr(model, "random_init", None) or [])
    if not parts:
        return []
    return [f"model '{name}' has random weights ({' and '.join(p.upper() for p in parts)} untrained: its config names no "
            "weights); its masks are noise — it exists to test code paths, not to segment"]


def domain_warnings(name: str, domain: str | None, rgb: np.ndarray, command: str) -> list[str]:
    from sspsam.predict.domain import DOMAIN, out_of_domain_warning

    from sspsam.predict.domain import grayscale_warning

    if domain != DOMAIN:
        return []
    warning = out_of_domain_warning(name, rgb, command) or grayscale_warning(name, rgb)
    return [warning] if warning else []


def is_batch(image) -> bool:
    """A list/tuple of images, or a 4-D tensor/array [B, …] (one image is 2-D or 3-D)."""
    if isinstance(image, (list, tuple)):
        return True
    return (is_tensor(image) or isinstance(image, np.ndarray)) and image.ndim == 4


def per_image(images: list, texts, what: str = "phrase") -> list:
    """The texts of each image of a batch: ``texts`` is one list shared by every image (or one
    string), or one list per image (a list of lists). ``what``: 'phrase' or 'class', for the error."""
    each = isinstance(texts, (list, tuple)) and bool(texts) and all(isinstance(t, (list, tuple)) for t in texts)
    if not each:
        return [texts] * len(images)
    if len(texts) != len(images):
        raise TextError(f"{len(images)} images but {len(texts)} {what} lists: give one list per image, or one shared list")
    return list(texts)


def check_finite(name: str, *tensors) -> None:
    """NaN or inf out of a model means broken weights; say so rather than write "score": NaN."""
    for t in tensors:
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ModelOutputError(f"model '{name}' produced non-finite outputs (NaN or inf); its weights are damaged")


def variant_checkpoint(name: str) -> Path:
    """The trained checkpoint published for a variant name (downloaded on first use), or an error
    saying to pass a checkpoint path: an architecture name alone has no trained weights."""
    import sspsam.io.weights as weights

    if name not in weights.REGISTRY:
        raise CheckpointError(
            f"'{name}' is an architecture, and no trained weights are published for it: pass the path of a "
            f"checkpoint (`sspsam train {name} …` writes one), or use a bundled model or 'zeroshot' (see `sspsam models`)"
        )
    return weights.ensure(name)


_is_batch = is_batch  # the earlier name (predict/zeroshot_res.py imports it until it moves)

"""Cached SAM image embeddings for training, as the official SSP-SAM code trains: the frozen SAM image
encoder (ViT-B/L/H at 1024²: most of a training step's time) runs once per image, not once per
sample per epoch.

What is cached: SAM's image embedding after the neck (``sam.encode_image``: [C, S/16, S/16]) and
nothing else. CLIP's image tower still runs on every step (it may train). The cache is valid only
while the SAM image encoder is frozen and the image the encoder sees is the same every epoch, so
``--cached-features`` *refuses* image augmentation (scale/colour jitter, flips) in the referring
trainer; the OVSS trainer's random horizontal flip is served by caching both views (plain and
mirrored) deterministically.

A cache folder holds

* ``manifest.json`` — the identity of the cache: model type, config name, a hash of the ``sam``
  config section, a hash of the SAM image-encoder weights actually used (random init depends on the
  seed; ``--init`` may load other weights), the dataset (name, split, input size, a fingerprint of
  its image list with file sizes), the views, dtype, shape and shard size, and ``complete``.
* ``shard-00000.npy`` … — ``.npy`` files of ``shard_size`` rows (row = image × views + view),
  written through a memory map and moved into place atomically; read back with ``mmap_mode="r"``.

Resumable: the manifest is written first; a run that finds a manifest with the same identity
keeps the shards already there (each was moved into place whole) and continues at the first
missing one; the temporary file of a shard a killed run was writing is deleted. Batches never
straddle a shard, so a resumed run computes each shard from the same batches and writes the same
bytes on the same machine and thread count (tests/test_feature_cache.py kills a run with SIGKILL
and compares). One writer per folder (``flock``).

Precision: ``float16`` (the default) halves the disk size; it changes the embeddings by their
rounding and therefore the losses, slightly (tests/test_feature_cache.py measures the gap on the
tiny config; that is a measurement, not a guarantee for other models). ``float32`` stores the
encoder's output as it came: the loss curve then equals the uncached one up to float rounding
between encoder batches of different sizes. The cache is computed in fp32 whatever
``--precision`` training uses; under bf16 autocast the uncached path runs the encoder in bf16, so
the two paths differ by bf16's rounding there.

One builder serves every task (:func:`build_cache`): the task says which rows there are, what
images they hold and what identity they carry (:class:`CacheRows`); this module runs the encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

from sspsam.io.checkpoint import atomic_write
from sspsam.errors import SSPSamError

FORMAT = "sspsam-feature-cache"
VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
DTYPES = ("float16", "float32")
TOWER = "sam.image_encoder"
# the keys that make two caches the same cache (``complete`` and bookkeeping are not among them)
IDENTITY = ("format", "version", "tower", "model", "config", "sam_config_hash", "encoder_hash", "dataset",
            "views", "dtype", "shape", "shard_size", "rows")


class FeatureCacheError(SSPSamError):
    """A feature cache is missing, incomplete, damaged or was built for another model or dataset."""


# ----------------------------------------------------------------------------------------------
# identity


def encoder_hash(module) -> str:
    """A hash of a module's weights (names, dtypes, shapes, bytes): the embeddings are a function of them."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update((t.view(torch.uint8) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def sam_config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg.get("sam") or {}, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ImageIndex:
    """The distinct images of a dataset, in order of first appearance, and each sample's image."""

    keys: list[str]  # image paths (relative to the data root where possible)
    sample_rows: np.ndarray  # [len(dataset)] image number of each sample
    first_sample: list[int]  # a sample showing each image (its letterbox is the image's)
    files: list[Path]

    def fingerprint(self, extra: dict) -> str:
        h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
        for key, f in zip(self.keys, self.files):
            try:
                size = f.stat().st_size
            except OSError:
                size = -1
            h.update(f"{key}\0{size}\n".encode())
        return h.hexdigest()[:32]


def image_index(dataset, data_root: str | Path) -> ImageIndex:
    """Referring datasets (``records``: several sentences per image) and semantic-segmentation
    datasets (``pairs``: one sample per image)."""
    root = Path(data_root).resolve()
    if hasattr(dataset, "records"):
        paths = [Path(r.image_path) for r in dataset.records]
    elif hasattr(dataset, "pairs"):
        paths = [Path(p[0]) for p in dataset.pairs]
    else:
        raise FeatureCacheError(f"cannot cache features of a {type(dataset).__name__}: it lists no image paths")
    keys: list[str] = []
    files: list[Path] = []
    first: list[int] = []
    where: dict[str, int] = {}
    rows = np.empty(len(paths), dtype=np.int64)
    for i, p in enumerate(paths):
        ap = p.resolve()
        try:
            key = ap.relative_to(root).as_posix()
        except ValueError:
            key = ap.as_posix()
        if key not in where:
            where[key] = len(keys)
            keys.append(key)
            files.append(ap)
            first.append(i)
        rows[i] = where[key]
    return ImageIndex(keys, rows, first, files)


# ----------------------------------------------------------------------------------------------
# building


class CacheRows(NamedTuple):
    """What a training task caches: its identity (model, config, SAM section and weights, dataset,
    views), the number of rows, and ``images(rows)`` → (images [N,3,S,S], valid_hw [N,2] or None),
    each row's input exactly as the encoder sees it in training."""

    identity: dict
    rows: int
    images: Callable


def build_cache(task, out_dir: str | Path, *, seed: int, batch_size: int = 8, shard_size: int = 64,
                dtype: str = "float16", device: str = "cpu", progress=None) -> dict:
    """SAM image embeddings of every row ``task`` trains on, for ``--cached-features out_dir`` with
    the same config, data, seed and task options: the model is the one the task builds for training."""
    import torch

    model = task.build(seed)
    plan = task.cache_rows(model)
    dev = torch.device(device)
    sam = model.sam.to(dev).eval()

    def encode(rows: list[int]):
        images, valid = plan.images(rows)
        with torch.no_grad():
            return sam.encode_image(images.to(dev), None if valid is None else valid.to(dev)).float().cpu().numpy()

    identity = dict(plan.identity)
    identity.update(dtype=dtype, shape=list(encode([0]).shape[1:]), shard_size=int(shard_size), rows=int(plan.rows))
    return write_cache(out_dir, identity, encode, batch_size=batch_size, progress=progress)


# ----------------------------------------------------------------------------------------------
# writing


def _read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeatureCacheError(f"{path} is not a readable feature-cache manifest ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise FeatureCacheError(f"{path} is not an sspsam feature-cache manifest")
    if int(obj.get("version", 0)) > VERSION:
        raise FeatureCacheError(f"{path} was written by a newer sspsam (feature cache version {obj.get('version')})")
    return obj


def _write_manifest(directory: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1)
    atomic_write(directory / MANIFEST, lambda tmp: Path(tmp).write_text(text))


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npy"


def _shard_ok(path: Path, rows: int, shape: Sequence[int], dtype: str) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows, *shape) and arr.dtype == np.dtype(dtype)


def write_cache(
    directory: str | Path,
    identity: dict,
    encode: Callable[[list[int]], np.ndarray],
    *,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Fill ``directory`` with ``identity["rows"]`` rows; ``encode(rows)`` returns their embeddings
    [len(rows), *shape] (float32). A folder holding another cache is refused; one holding this
    cache, finished or not, is completed. Returns the manifest plus ``written`` / ``kept`` counts."""
    directory = Path(directory)
    if identity["dtype"] not in DTYPES:
        raise FeatureCacheError(f"cache dtype must be one of {', '.join(DTYPES)}, got {identity['dtype']!r}")
    if batch_size < 1 or identity["shard_size"] < 1:
        raise FeatureCacheError("batch size and shard size must be >= 1")
    manifest = {"format": FORMAT, "version": VERSION, "tower": TOWER, **identity}
    if directory.exists() and not directory.is_dir():
        raise FeatureCacheError(f"{directory} is a file, not a folder for a feature cache")
    old = _read_manifest(directory) if directory.is_dir() else None
    if old is not None:
        diff = [k for k in IDENTITY if old.get(k) != manifest.get(k)]
        if diff:
            raise FeatureCacheError(f"{directory} holds a feature cache for something else ({', '.join(diff)} differ): "
                                    "delete it or choose another folder")
    elif directory.is_dir() and any(p.name != LOCK for p in directory.iterdir()):
        raise FeatureCacheError(f"{directory} is not empty and holds no feature cache: choose an empty or new folder")
    n, size, shape, dtype = int(manifest["rows"]), int(manifest["shard_size"]), tuple(manifest["shape"]), manifest["dtype"]
    n_shards = max(1, -(-n // size))
    manifest["shards"] = n_shards
    manifest["complete"] = False
    directory.mkdir(parents=True, exist_ok=True)
    with _writer_lock(directory):
        # a killed run leaves the temporary file of the shard it was writing (atomic_write cleans up
        # only when Python survives); nobody else writes here while we hold the lock
        for stale in directory.glob(".shard-*.npy.*.tmp"):
            stale.unlink(missing_ok=True)
        _write_manifest(directory, manifest)
        written = kept = 0
        for k in range(n_shards):
            lo, hi = k * size, min(n, (k + 1) * size)
            path = directory / shard_name(k)
            if path.is_file() and _shard_ok(path, hi - lo, shape, dtype):
                kept += 1
            else:
                _write_shard(path, lo, hi, shape, dtype, encode, batch_size)
                written += 1
            if progress is not None:
                progress(hi, n)
        manifest["complete"] = True
        _write_manifest(directory, manifest)
    return {**manifest, "written": written, "kept": kept}


class _writer_lock:
    """One writer per cache folder: a second `cache-features` into the same folder would delete
    the first one's temporary files. ``flock`` is released by the kernel when a run is killed."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock, one writer is the user's job
            return self
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise FeatureCacheError(f"another `sspsam cache-features` is writing to {self.path.parent}: wait for it "
                                    "or choose another folder") from None
        return self

    def __exit__(self, *exc):
        self.fh.close()
        return False


def _write_shard(path: Path, lo: int, hi: int, shape, dtype: str, encode, batch_size: int) -> None:
    def write(tmp):
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(hi - lo, *shape))
        for b in range(lo, hi, batch_size):
            rows = list(range(b, min(hi, b + batch_size)))
            out = np.asarray(encode(rows))
            if out.shape != (len(rows), *shape):
                raise FeatureCacheError(f"the encoder gave embeddings of shape {out.shape[1:]}, expected {tuple(shape)}")
            mm[b - lo : b - lo + len(rows)] = out.astype(dtype, copy=False)
        mm.flush()
        del mm

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------
# reading


class FeatureCache:
    """A finished cache, read through memory maps (shards opened on first use)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FeatureCacheError(f"no feature cache at {self.directory}: build one with `sspsam cache-features`")
        m = _read_manifest(self.directory)
        if m is None:
            raise FeatureCacheError(f"{self.directory} holds no {MANIFEST}: build the cache with `sspsam cache-features`")
        missing = [k for k in (*IDENTITY, "shards", "complete") if k not in m]
        if missing:
            raise FeatureCacheError(f"{self.directory / MANIFEST} lacks {', '.join(missing)}")
        if not m["complete"]:
            have = sum((self.directory / shard_name(k)).is_file() for k in range(int(m["shards"])))
            raise FeatureCacheError(f"the feature cache {self.directory} is incomplete ({have}/{m['shards']} shards): "
                                    "run the same `sspsam cache-features` command again to finish it")
        self.manifest = m
        self.shape = tuple(m["shape"])
        self.shard_size = int(m["shard_size"])
        self.rows = int(m["rows"])
        self.views = list(m["views"])
        self._maps: dict[int, np.ndarray] = {}

    def check(self, **expected) -> None:
        """Refuse a cache built for another model or dataset: one line naming what differs."""
        m, here = self.manifest, self.directory
        if "model" in expected and m["model"] != expected["model"]:
            raise FeatureCacheError(f"the feature cache {here} was built for a {m['model']} model, not {expected['model']}")
        if "sam_config_hash" in expected and m["sam_config_hash"] != expected["sam_config_hash"]:
            raise FeatureCacheError(f"the feature cache {here} was built for config '{m['config']}' with another SAM "
                                    "section: rebuild it for this config")
        if "encoder_hash" in expected and m["encoder_hash"] != expected["encoder_hash"]:
            raise FeatureCacheError(f"the feature cache {here} was built from other SAM image-encoder weights "
                                    "(another seed, --init or weights file): rebuild it with the same settings as training")
        if "dataset" in expected and m["dataset"] != expected["dataset"]:
            a, b = m["dataset"], expected["dataset"]
            what = ", ".join(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise FeatureCacheError(f"the feature cache {here} was built for another dataset ({what} differ: "
                                    f"cache {a.get('name')}/{a.get('split')}, here {b.get('name')}/{b.get('split')})")
        if "views" in expected and self.views != list(expected["views"]):
            raise FeatureCacheError(f"the feature cache {here} holds views {self.views}, this training needs {list(expected['views'])}")

    def _shard(self, k: int) -> np.ndarray:
        mm = self._maps.get(k)
        if mm is None:
            path = self.directory / shard_name(k)
            lo, hi = k * self.shard_size, min(self.rows, (k + 1) * self.shard_size)
            try:
                mm = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise FeatureCacheError(f"feature-cache shard {path} is missing or damaged ({exc}): rebuild the cache") from None
            if mm.shape != (hi - lo, *self.shape) or mm.dtype != np.dtype(self.manifest["dtype"]):
                raise FeatureCacheError(f"feature-cache shard {path} has shape {mm.shape} {mm.dtype}, "
                                        f"expected {(hi - lo, *self.shape)} {self.manifest['dtype']}: rebuild the cache")
            self._maps[k] = mm
        return mm

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int) -> np.ndarray:
        """Row ``row`` as float32 [C, h, w] (a copy: the map stays read-only)."""
        row = int(row)
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range for a cache of {self.rows}")
        return np.array(self._shard(row // self.shard_size)[row % self.shard_size], dtype=np.float32)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(self.rows))


# ----------------------------------------------------------------------------------------------
# feeding a model


class sam_embeddings:
    """For one forward, ``sam.encode_image`` answers with the cached embeddings instead of running
    the encoder: the models' own ``encode_image`` / ``forward`` (CLIP, text, decoder) stay exactly
    the code the uncached path runs. The override is an instance attribute, removed on exit."""

    def __init__(self, sam, embeddings):
        self.sam, self.embeddings = sam, embeddings

    def __enter__(self):
        emb = self.embeddings

        def cached(images, valid_hw=None):
            if images.shape[0] != emb.shape[0]:
                raise ValueError(f"{images.shape[0]} images but {emb.shape[0]} cached embeddings")
            return emb.to(device=images.device)

        self.sam.__dict__["encode_image"] = cached
        return self

    def __exit__(self, *exc):
        self.sam.__dict__.pop("encode_image", None)
        return False

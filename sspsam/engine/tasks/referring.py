"""Referring segmentation (image + phrase → mask) for :func:`sspsam.engine.loop.fit`.

Any model that takes ``(images, tokens, valid_hw)`` and returns SSP-SAM's output dict
(``mask_logits`` [T,1,h,w]; optionally ``box`` and ``no_target_logit``) trains here: the task asks
the model only for ``image_size`` and ``tokenize`` (else its ``clip.tokenize``), and uses
``box_target`` / ``freeze`` / ``sam`` when it has them. The official recipe (``train.recipe:
official``: by epochs, two stages, stage 1 box-only) needs SSP-SAM's own parts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

import sspsam.engine.feature_cache as fc
import sspsam.engine.recipe as official_recipe
from sspsam.engine.loop import TrainTask, check_learning_rate
from sspsam.engine.losses import box_losses, ssp_loss
from sspsam.engine.state import seed_everything
from sspsam.errors import ConfigError, OptionError
from sspsam.io.checkpoint import load_into
from sspsam.models.build import build_model, read_sspsam_checkpoint


def referring_dataset(name: str, data_root, image_size: int, tcfg: dict, official: bool = False):
    """The training reader. sspsam's own augmentations (scale jitter 0.7–1, colour jitter 0.2) are
    on by default for non-official recipes; under ``recipe: official`` they are off unless the
    config names them (``scale_range``, ``colour_jitter``, ``flip``): the official pipeline has no
    scale, colour or flip augmentation (see the recipe config)."""
    from sspsam.data import open_referring

    if official:
        train = any(k in tcfg for k in ("scale_range", "colour_jitter")) or bool(tcfg.get("flip", False))
        kwargs = dict(train=train, flip=bool(tcfg.get("flip", False)),
                      scale_range=tuple(tcfg.get("scale_range", (1.0, 1.0))),
                      colour_jitter=float(tcfg.get("colour_jitter", 0.0)))
    else:
        kwargs = dict(train=bool(tcfg.get("augment", True)), flip=bool(tcfg.get("flip", False)),
                      scale_range=tuple(tcfg.get("scale_range", (0.7, 1.0))),
                      colour_jitter=float(tcfg.get("colour_jitter", 0.2)))
    if name == "refcoco-merged":
        from sspsam.data.merged import MergedRefCOCODataset

        return MergedRefCOCODataset(data_root, tcfg.get("split", "train"), image_size, **kwargs)
    return open_referring(name, data_root, tcfg.get("split", "train"), image_size, **kwargs)


def to_batch(samples: list[dict]) -> dict:
    """Dataset samples → the tensors the loss needs (valid_hw only when every sample has one;
    ``sam_embed`` when the samples come from a feature cache)."""
    out = {
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([torch.as_tensor(s["mask"]).bool() for s in samples]),
        "box": torch.stack([torch.as_tensor(s["box"], dtype=torch.float32) for s in samples]),
        "no_target": torch.tensor([bool(s["no_target"]) for s in samples], dtype=torch.bool),
        "text": [s["text"] for s in samples],
    }
    if all("valid_hw" in s for s in samples):
        out["valid_hw"] = torch.stack([torch.as_tensor(s["valid_hw"]) for s in samples])
    if "sam_embed" in samples[0]:
        out["sam_embed"] = torch.stack([s["sam_embed"] for s in samples])
    return out


class CachedSamples(torch.utils.data.Dataset):
    """The training reader plus each sample's cached SAM image embedding (``sam_embed``)."""

    def __init__(self, dataset, cache, sample_rows) -> None:
        self.dataset, self.cache, self.sample_rows = dataset, cache, sample_rows

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        sample = self.dataset[i]
        sample["sam_embed"] = torch.from_numpy(self.cache[int(self.sample_rows[i])])
        return sample


class BoxPretraining(torch.nn.Module):
    """Stage 1 of the official recipe: CLIP + the SSP encoder up to the auxiliary box, no SAM (the
    official model returns before SAM when ``is_pretrain``). A module so DDP can wrap it."""

    def __init__(self, core) -> None:
        super().__init__()
        self.core = core

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, valid_hw=None) -> dict:
        patches, _ = self.core.clip.encode_image(images)
        return self.core.ssp_encoder(patches, self.core.encode_text(tokens))


def freeze(model, parts: list[str]) -> None:
    if hasattr(model, "freeze"):
        model.freeze(parts)
        return
    for name in parts:
        model.get_submodule(name).requires_grad_(False)


def build_training_model(cfg: dict, seed: int, load_backbones: bool = True, init=None):
    """The model as training builds it (seeded init, backbone weights, ``init``, frozen parts): the
    feature cache must see the same SAM image-encoder weights."""
    seed_everything(seed)
    model = build_model(cfg)
    if load_backbones:
        for part in ("clip", "sam"):
            name = (cfg.get(part) or {}).get("weights")
            if name:
                from sspsam.io.weights import require

                getattr(model, part).load_checkpoint(require(name))
    if init is not None:
        load_into(model, read_sspsam_checkpoint(init)["state_dict"], what=f"--init checkpoint {init}", strict=False)
    frozen = list((cfg.get("train") or {}).get("freeze") or [])
    if frozen:
        freeze(model, frozen)
    return model


def param_groups(model, lr: float, decoder_lr: float, weight_decay: float = 1e-4) -> list[dict]:
    """The official recipe's two learning rates: SAM's pretrained mask decoder moves 10x slower."""
    dec = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("sam.mask_decoder.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("sam.mask_decoder.")]
    return [{"params": rest, "lr": lr, "weight_decay": weight_decay}, {"params": dec, "lr": decoder_lr, "weight_decay": weight_decay}]


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """LambdaLR factor for optimizer step s (0-based): linear warm-up, then cosine to min_ratio."""
    total_steps, warmup_steps = max(1, int(total_steps)), max(0, int(warmup_steps))

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (s - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


class ReferringTask(TrainTask):
    """A referring model on a referring data set: :func:`ssp_loss` (or stage 1's box losses), two
    learning rates (SAM's mask decoder 10x slower), the official per-epoch recipe when the config
    names it. ``stage``/``epochs`` need that recipe; ``init`` (a ``model.pt``, e.g. stage 1's)
    initialises the weights non-strictly, as the official ``--resume_from_pretrain`` does;
    ``cached_features`` reads SAM's image embeddings from a feature cache instead of the encoder."""

    def __init__(self, cfg: dict, data_root, *, dataset: str | None = None, lr: float = 1e-4, decoder_lr: float = 1e-5,
                 stage: int | None = None, epochs: int | None = None, warmup_steps: int | None = None,
                 clip_grad: float | None = None, weight_decay: float | None = None, load_backbones: bool = True,
                 init=None, cached_features=None) -> None:
        official = official_recipe.is_official(cfg)
        if stage is not None and not official:
            raise ConfigError("--stage needs a config with train.recipe: official")
        if epochs is not None and not official:
            raise ConfigError("--epochs needs a config with train.recipe: official (other recipes count --steps)")
        st = official_recipe.stage(cfg, int(stage or 2)) if official else None
        if st is not None and epochs is not None:
            st = dataclasses.replace(st, epochs=int(epochs))
        check_learning_rate("lr", lr)
        check_learning_rate("decoder_lr", decoder_lr)
        self.tcfg = tcfg = dict(cfg.get("train") or {})
        self.cfg, self.data_root, self.st = cfg, data_root, st
        self.dataset_name = dataset or (st.dataset if st is not None else None) or "refcoco"
        self.lr, self.decoder_lr, self.warmup_steps = lr, decoder_lr, warmup_steps
        self.clip_grad = float(tcfg.get("clip_grad", 0.1)) if clip_grad is None else clip_grad
        self.weight_decay = float(tcfg.get("weight_decay", 1e-4)) if weight_decay is None else weight_decay
        self.load_backbones, self.init, self.cached_features = load_backbones, init, cached_features
        self.frozen = list(tcfg.get("freeze") or [])
        self.loss_weights = dict(cfg.get("loss") or {})
        self.official = st is not None
        self.box_only = self.official and st.box_only
        self.decoder_always_frozen = any(f in ("sam", "sam.mask_decoder") for f in self.frozen)
        self.decoder_frozen = None
        self.steps_per_epoch = 0

    def build(self, seed: int):
        return build_training_model(self.cfg, seed, self.load_backbones, self.init)

    def open_data(self):
        self._reader = referring_dataset(self.dataset_name, self.data_root, 1024, self.tcfg, self.official)
        return self._reader

    def _reader_for(self, core):
        ds = getattr(self, "_reader", None) or self.open_data()
        ds.image_size = int(core.image_size)  # records do not depend on it; samples are cut at the model's size
        return ds

    def dataset(self, core):
        ds = self._reader_for(core)
        if self.cached_features is None:
            return ds
        self.check_cacheable(core, ds, training=True)
        cache = fc.FeatureCache(self.cached_features)
        index = fc.image_index(ds, self.data_root)
        want = self.cache_identity(core, index)
        # a model built without SAM's image encoder (sam.image_encoder: false) cannot be checked against its weights
        keys = ("model", "sam_config_hash", "dataset", "views") + (("encoder_hash",) if want["encoder_hash"] else ())
        cache.check(**{k: want[k] for k in keys})
        return CachedSamples(ds, cache, index.sample_rows)

    # ---- feature cache ------------------------------------------------------------------------

    def check_cacheable(self, core, ds, training: bool = False) -> None:
        """Cached embeddings are exact only when the cached tower is frozen and every epoch feeds it
        the same image; otherwise refuse, in one line."""
        if training and self.box_only:
            raise ConfigError("--cached-features: official stage 1 never runs SAM's image encoder, so there is nothing to cache")
        sam = getattr(core, "sam", None)
        if sam is None:
            raise ConfigError(f"--cached-features: config '{self.cfg.get('name')}' builds a model without SAM's image encoder: nothing to cache")
        encoder = sam.image_encoder
        if encoder is not None and any(p.requires_grad for p in encoder.parameters()):
            raise ConfigError(f"--cached-features needs SAM's image encoder frozen, but config '{self.cfg.get('name')}' trains it "
                              "(add sam.image_encoder to train.freeze)")
        if getattr(ds, "train", False):
            raise ConfigError("--cached-features needs training without image augmentation (scale/colour jitter, flips change "
                              "the image each epoch): set train.augment: false, or use the official recipe without "
                              "scale_range/colour_jitter/flip")

    def cache_identity(self, core, index) -> dict:
        ds_id = {"name": self.dataset_name, "split": self.tcfg.get("split", "train"), "image_size": int(core.image_size),
                 "images": len(index.keys)}
        ds_id["fingerprint"] = index.fingerprint(ds_id)
        encoder = core.sam.image_encoder
        return {"model": self.cfg.get("model"), "config": self.cfg.get("name", "?"), "sam_config_hash": fc.sam_config_hash(self.cfg),
                "encoder_hash": fc.encoder_hash(encoder) if encoder is not None else None, "dataset": ds_id, "views": ["plain"]}

    def cache_rows(self, core) -> fc.CacheRows:
        """Row r: SAM's embedding of the r-th distinct image, in the letterbox its first sample has."""
        ds = self._reader_for(core)
        self.check_cacheable(core, ds)
        index = fc.image_index(ds, self.data_root)

        def images(rows: list[int]):
            samples = [ds[index.first_sample[r]] for r in rows]
            return (torch.stack([s["image"] for s in samples]),
                    torch.stack([torch.as_tensor(s["valid_hw"]) for s in samples]))

        return fc.CacheRows(self.cache_identity(core, index), len(index.keys), images)

    # ---- optimisation -------------------------------------------------------------------------

    def collate(self, samples):
        return to_batch(samples)

    def param_groups(self, core):
        return param_groups(core, self.lr, self.decoder_lr, self.weight_decay)

    def plan(self, batches_per_epoch, grad_accum, steps, total_steps):
        if self.st is None:
            if steps is None:
                raise OptionError("steps is required (the number of optimizer steps to reach)")
            return int(steps), int(total_steps or self.tcfg.get("total_steps") or steps or 1), 0
        # one optimizer step = grad_accum micro-batches; the lr of a step is its epoch's lr
        self.steps_per_epoch = max(1, batches_per_epoch // grad_accum)
        total_steps = self.st.epochs * self.steps_per_epoch
        return (total_steps if steps is None else int(steps)), total_steps, self.steps_per_epoch

    def scheduler(self, optimizer, total_steps, steps_per_epoch):
        if self.st is None:
            warmup = self.warmup_steps
            if warmup is None:
                warmup = int(self.tcfg.get("warmup_steps", max(1, round(0.05 * total_steps))))
            return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, warmup))
        bases = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, official_recipe.official_schedule(self.st, bases, steps_per_epoch))

    def prepare(self, step, core):
        # the official recipe freezes SAM's decoder for its first epochs (DDP must then be rebuilt)
        if self.st is None or self.st.decoder_frozen(step // self.steps_per_epoch) == self.decoder_frozen:
            return False
        self.decoder_frozen = self.st.decoder_frozen(step // self.steps_per_epoch)
        core.sam.mask_decoder.requires_grad_(not self.decoder_frozen and not self.decoder_always_frozen)
        return True

    def forward_module(self, core):
        return BoxPretraining(core) if self.box_only else core

    def loss(self, module, core, batch, autocast):
        tokenize = core.tokenize if hasattr(core, "tokenize") else core.clip.tokenize
        tokens = tokenize(batch["text"]).to(batch["image"].device)
        feed = fc.sam_embeddings(core.sam, batch["sam_embed"]) if "sam_embed" in batch else contextlib.nullcontext()
        with autocast(), feed:
            out = module(batch["image"], tokens, batch.get("valid_hw"))
        out = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
        box = core.box_target(batch["box"], batch.get("valid_hw")) if hasattr(core, "box_target") else batch["box"]
        if self.box_only:
            has = ~batch["no_target"]
            return box_losses(out["box"][has], box[has], self.loss_weights) if has.any() else {"total": out["box"].sum() * 0}
        return ssp_loss(out, batch["mask"], box, batch["no_target"], self.loss_weights)

    def log_fields(self, optimizer, step):
        lrs = [g["lr"] for g in optimizer.param_groups]
        rec = {"lr": lrs[0], "decoder_lr": lrs[1]}
        if self.st is not None:
            rec["epoch"] = step // self.steps_per_epoch
        return rec

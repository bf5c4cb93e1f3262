"""A fourth method added from outside sspsam — its own package, one registry entry, one YAML — is
built, trained, saved, loaded and run through the command line without touching an sspsam file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

MODEL = '''
"""A trivial referring model: a few convolutions on the image, a bag of hashed words for the phrase."""
from dataclasses import dataclass, fields, replace
import zlib

import torch
from torch import nn


@dataclass(frozen=True)
class ToySection:
    image_size: int = 64
    width: int = 16
    vocab: int = 512


@dataclass
class ToyFeatures:
    maps: torch.Tensor  # [B, C, h, w]


class Toy(nn.Module):
    def __init__(self, clip, sam, section: dict, config: dict | None = None):
        super().__init__()
        s = ToySection(**section)
        self.config = config or {}
        self.size, self.vocab = s.image_size, s.vocab
        self.image = nn.Sequential(nn.Conv2d(3, s.width, 3, 2, 1), nn.ReLU(), nn.Conv2d(s.width, s.width, 3, 2, 1))
        self.words = nn.EmbeddingBag(s.vocab, s.width, mode="mean", padding_idx=0)
        self.box_head = nn.Linear(s.width, 4)
        self.no_target_head = None

    @property
    def image_size(self) -> int:
        return self.size

    def clip_input(self, rgbs, device="cpu"):
        return None

    def encode_image(self, images, valid_hw=None, clip_images=None):
        return ToyFeatures(self.image(images / 255.0))

    def tokenize(self, phrases):
        ids = [[1 + zlib.crc32(w.encode()) % (self.vocab - 1) for w in p.lower().split()] or [0] for p in phrases]
        n = max(len(i) for i in ids)
        return torch.tensor([i + [0] * (n - len(i)) for i in ids])

    def encode_text(self, tokens):
        return self.words(tokens.to(self.box_head.weight.device))

    def decode(self, image, text, image_index=None):
        if image_index is None:
            image_index = torch.arange(text.shape[0], device=text.device)
        maps = image.maps[image_index]
        logits = (maps * text[:, :, None, None]).sum(1, keepdim=True)
        return {"mask_logits": logits, "iou": torch.ones(text.shape[0], device=text.device),
                "box": self.box_head(text).sigmoid()}

    def forward(self, images, tokens, valid_hw=None):
        return self.decode(self.encode_image(images, valid_hw), self.encode_text(tokens))

    def box_target(self, box, valid_hw):
        return box

    def freeze(self, parts):
        for name in parts:
            self.get_submodule(name).requires_grad_(False)
'''

METHOD = '''
from sspsam.models.registry import REFERRING, Method, register

register(Method(
    name="toymethod", task=REFERRING, model="toymethod.model:Toy", section="toy",
    schema="toymethod.model:ToySection", backbones=(),
    training_task="sspsam.engine.tasks.referring:ReferringTask",
    seed=0, lr=1e-3, decoder_lr=1e-3,
))
'''

CONFIG = '''
model: toymethod
toy: {image_size: 64, width: 16}
train: {freeze: []}
loss: {dice: 1.0, focal: 1.0}
inference: {mask_threshold: 0.0, no_target_min_pixels: 1}
'''


def _sspsam(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sspsam.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def test_a_fourth_method_trains_and_segments_through_the_cli(tmp_path):
    from sspsam.data.generate import generate_refer

    pkg = tmp_path / "toymethod"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text(textwrap.dedent(MODEL))
    (pkg / "method.py").write_text(textwrap.dedent(METHOD))
    (tmp_path / "toy.yaml").write_text(textwrap.dedent(CONFIG))
    generate_refer(tmp_path / "data", "refcoco", n_images=6, seed=0)
    image = np.full((64, 64, 3), 255, np.uint8)
    image[20:44, 20:44] = (0, 0, 255)
    Image.fromarray(image).save(tmp_path / "image.png")

    env = {**os.environ, "SSPSAM_METHODS": "toymethod.method", "SSPSAM_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = _sspsam(["train", "toy.yaml", "--data", "data", "--steps", "2", "--batch-size", "2", "--out", "run",
                    "--device", "cpu", "--set", "train.warmup_steps=1"], env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "run" / "model.pt").is_file()

    done = _sspsam(["segment", "image.png", "the blue square", "-m", "run/model.pt", "-o", "out", "--device", "cpu"],
                   env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert any((tmp_path / "out").iterdir())

    # without the plugin the type is unknown, with a hint of what is known
    env.pop("SSPSAM_METHODS")
    done = _sspsam(["train", "toy.yaml", "--data", "data", "--steps", "2", "--out", "run2"], env, tmp_path)
    assert done.returncode != 0 and "unknown model type 'toymethod'" in done.stderr


def test_the_registry_answers_unknown_types_and_keys_with_a_hint():
    import pytest

    from sspsam.config import apply_overrides, load_config
    from sspsam.errors import ConfigError
    from sspsam.models import registry

    with pytest.raises(ConfigError, match="did you mean 'sam-mi'"):
        registry.get("sam_mi")
    cfg = apply_overrides(load_config("ssp-sam-tiny"), ["train.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr' in config 'ssp-sam-tiny' \(did you mean 'train.lr'\?\)"):
        registry.validate(cfg)
    typed = registry.validate(apply_overrides(load_config("ssp-sam-tiny"), ["train.lr=2e-4", "inference.mask_threshold=0.5"]))
    assert typed.train.lr == 2e-4 and typed.inference.mask_threshold == 0.5
    assert registry.for_config(load_config("ssp-sam-tiny")).seed == 3407
    assert {m.name for m in registry.methods("ovss")} >= {"escnet", "sam-mi"}

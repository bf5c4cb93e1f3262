"""Training from cached SAM image embeddings (`sspsam cache-features`, `train --cached-features`):
the same loss curve as the uncached run, resumable byte-identical cache building, and one-line
refusals of caches built for something else or configs the cache would make wrong.

How the comparison is exact: the equality tests build the cache with ``dtype="float32"`` (the
``--dtype fp32`` option), which stores the encoder's output as it came, so cached and uncached
training see the same embeddings. The default fp16 cache rounds them; its loss gap on this tiny
config is measured and printed by ``test_fp16_cache_loss_difference`` (1.9e-6 here), which holds it
under the same 1e-5 but does not make fp16 exact."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import sspsam.engine.feature_cache as fc
from sspsam.config import load_config
from sspsam.errors import ConfigError
from sspsam.engine.feature_cache import FeatureCache, FeatureCacheError
from sspsam.engine.trainer import build_feature_cache, train
from typer.testing import CliRunner

from sspsam.cli.main import app

KW = dict(batch_size=2, lr=1e-3, decoder_lr=1e-4, seed=3407, log_every=1, tensorboard=False)
STEPS = 6

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from sspsam.data import generate_refer

    root = tmp_path_factory.mktemp("refcoco")
    generate_refer(root, "refcoco", n_images=12, seed=0)
    return root


TINY_FROZEN = """base: ssp-sam-tiny
train: {freeze: [clip, sam.image_encoder], warmup_steps: 2, augment: false}
"""


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    """The tiny config with the cached tower frozen and no augmentation, as a file the CLI can take."""
    path = tmp_path_factory.mktemp("cfg") / "tiny-frozen.yaml"
    path.write_text(TINY_FROZEN)
    return path


@pytest.fixture(scope="module")
def cfg(cfg_path):
    c = load_config(cfg_path)
    assert c["train"] == {"freeze": ["clip", "sam.image_encoder"], "warmup_steps": 2, "augment": False}
    return c


@pytest.fixture(scope="module")
def uncached(cfg, data_root, tmp_path_factory):
    return train(cfg, data_root, tmp_path_factory.mktemp("plain"), steps=STEPS, ckpt_every=STEPS, **KW)


@pytest.fixture(scope="module")
def cache32(cfg, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "f32"
    # shards of 4 rows and batches of 2: a batch never straddles a shard
    info = build_feature_cache(cfg, data_root, out, seed=KW["seed"], dtype="float32", shard_size=4, batch_size=2)
    return out, info


def _curve(res):
    return [(r["step"], r["total"], r["lr"]) for r in res["losses"]]


def test_cached_loss_curve_equals_uncached(cfg, data_root, uncached, cache32, tmp_path, monkeypatch):
    from sspsam.backbones.sam import SAMBackbone

    out, info = cache32
    assert info["complete"] and info["rows"] == 6 and info["shards"] == 2  # 6 distinct images, many sentences

    def never(*a, **k):
        raise AssertionError("the cached path ran SAM's image encoder")

    monkeypatch.setattr(SAMBackbone, "encode_image", never)
    res = train(cfg, data_root, tmp_path / "cached", steps=STEPS, ckpt_every=STEPS, cached_features=out, **KW)
    a, b = uncached["losses"], res["losses"]
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], abs=1e-5, rel=0), (ra["step"], k, ra[k], rb[k])
    # the trained weights agree too, and the saved model keeps its (unused) SAM image encoder
    sa = uncached["module"].state_dict()
    sb = res["module"].state_dict()
    assert sa.keys() == sb.keys()
    assert max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa) < 1e-4


def test_cached_rows_are_the_encoder_outputs(cfg, data_root, uncached, cache32):
    """Row r of the float32 cache is SAM's embedding of the r-th distinct image (up to the float
    rounding that differs between a batch of 2 and a batch of 1)."""
    from sspsam.engine.trainer import _dataset, build_training_model

    out, _ = cache32
    cache = FeatureCache(out)
    model = build_training_model(cfg, KW["seed"], True, None)
    ds = _dataset("refcoco", data_root, model.image_size, cfg["train"])
    index = fc.image_index(ds, data_root)
    assert len(index.keys) == 6 < len(ds)
    for r in (0, 5):
        s = ds[index.first_sample[r]]
        with torch.no_grad():
            want = model.sam.encode_image(s["image"][None], s["valid_hw"][None])[0].numpy()
        np.testing.assert_allclose(cache[r], want, rtol=0, atol=1e-5)
    # the weights the cache came from are the ones training builds
    assert fc.encoder_hash(model.sam.image_encoder) == cache.manifest["encoder_hash"]


def test_fp16_cache_loss_difference(cfg, data_root, uncached, tmp_path, capsys):
    """fp16 (the default) rounds the embeddings; on the tiny config the loss curve still stays
    within 1e-5 of the uncached one (measured 1.9e-6 here); the gap is printed."""
    out = tmp_path / "f16"
    build_feature_cache(cfg, data_root, out, seed=KW["seed"], shard_size=8, batch_size=2)
    assert np.load(out / "shard-00000.npy", mmap_mode="r").dtype == np.float16
    res = train(cfg, data_root, tmp_path / "c16", steps=STEPS, ckpt_every=STEPS, cached_features=out, **KW)
    gap = max(abs(a["total"] - b["total"]) for a, b in zip(uncached["losses"], res["losses"]))
    with capsys.disabled():
        print(f"\nfp16 cache: max |loss difference| over {STEPS} steps = {gap:.2e}")
    assert gap < 1e-5


KILLED_RUN = """
import os, signal, sys
import torch
torch.set_num_threads(1)
import sspsam.engine.feature_cache as fc
from sspsam.cli.main import app

real = fc._write_shard
shards = []

def write_shard(path, lo, hi, shape, dtype, encode, batch_size):
    shards.append(path.name)
    def dying(rows):
        if len(shards) == 2:  # the second shard's temporary file is open and unfilled
            os.kill(os.getpid(), signal.SIGKILL)
        return encode(rows)
    return real(path, lo, hi, shape, dtype, dying, batch_size)

fc._write_shard = write_shard
app(sys.argv[1:], prog_name="sspsam")
"""


def test_killed_build_resumes_to_identical_shards(cfg_path, data_root, cache32, tmp_path):
    """A `cache-features` run killed by SIGKILL in the middle of a shard (no Python clean-up runs)
    leaves its finished shards and a stray temporary file; running the same command again keeps
    the finished shards, writes the rest, and ends with the same bytes as an uninterrupted build."""
    import os
    import subprocess
    import sys

    ref, _ = cache32
    out = tmp_path / "resume"
    args = ["cache-features", str(cfg_path), "--data", str(data_root), "-o", str(out), "--dtype", "fp32",
            "--shard-size", "4", "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert (out / "shard-00000.npy").is_file() and not (out / "shard-00001.npy").exists()
    assert [p.name for p in out.glob(".shard-00001.npy.*.tmp")]  # the kill left half a shard behind
    with pytest.raises(FeatureCacheError, match=r"incomplete \(1/2 shards\)"):
        FeatureCache(out)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "2 shards" in res.output and "(1 written, 1 kept" in res.output
    assert not list(out.glob("*.tmp"))
    for name in ("shard-00000.npy", "shard-00001.npy"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    assert FeatureCache(out).manifest["encoder_hash"] == FeatureCache(ref).manifest["encoder_hash"]


def test_cli_cache_then_train(cfg_path, data_root, uncached, tmp_path):
    """`sspsam cache-features` then `sspsam train --cached-features`: the CLI's run logs the same
    losses as the uncached API run with the same settings (fp32 cache: exact)."""
    import json

    cache = tmp_path / "cache"
    res = CliRunner().invoke(app, ["cache-features", str(cfg_path), "--data", str(data_root), "-o", str(cache),
                                   "--dtype", "fp32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "6 images, 1 shards" in res.output
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(cfg_path), "--data", str(data_root), "-o", str(run), "--steps", "2",
                                   "--batch-size", "2", "--lr", "1e-3", "--decoder-lr", "1e-4", "--device", "cpu",
                                   "--cached-features", str(cache)])
    assert res.exit_code == 0, res.output
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "total" in r]
    assert [r["step"] for r in logged] == [1, 2]
    for a, b in zip(uncached["losses"], logged):
        assert b["total"] == pytest.approx(a["total"], abs=1e-5, rel=0)


@pytest.mark.parametrize("extra, message", [
    (["--dtype", "int8"], "--dtype must be fp16 or fp32"),
    (["--shard-size", "0"], "must be >= 1"),
    (["--data", "/nonexistent/sspsam-data"], "is not a folder"),
    (["--config", "ssp-sam-tiny"], "needs SAM's image encoder frozen"),
    (["--config", "no-such-variant"], "no model config"),
    (["--init", "/nonexistent/model.pt"], "--init checkpoint not found"),
    (["-o", "FILE"], "exists and is not a folder"),
    (["-o", "OTHER"], "not empty and holds no feature cache"),
])
def test_cli_cache_bad_input(cfg_path, data_root, tmp_path, extra, message):
    config = str(cfg_path)
    if extra[0] == "--config":
        config, extra = extra[1], []
    out = tmp_path / "c"
    if extra[:2] == ["-o", "FILE"]:
        out.write_text("x")
        extra = []
    elif extra[:2] == ["-o", "OTHER"]:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        extra = []
    res = CliRunner().invoke(app, ["cache-features", config, "--data", str(data_root), "-o", str(out), "--device", "cpu", *extra])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output


def test_cli_train_refuses_mismatched_cache(cfg_path, data_root, cache32, tmp_path):
    out, _ = cache32
    base = ["train", str(cfg_path), "--data", str(data_root), "-o", str(tmp_path / "r"), "--steps", "1",
            "--batch-size", "2", "--device", "cpu", "--cached-features"]
    for extra, message in (([str(out), "--seed", "1"], "other SAM image-encoder weights"),
                           ([str(tmp_path / "none")], "no feature cache")):
        res = CliRunner().invoke(app, base + extra)
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], res.output


def test_refusals_are_one_line(cfg, data_root, cache32, tmp_path):
    out, _ = cache32

    def refused(exc_type, match, **kw):
        c = kw.pop("cfg", cfg)
        with pytest.raises(exc_type, match=match) as e:
            train(c, data_root, tmp_path / "r", steps=1, ckpt_every=1, cached_features=kw.pop("cache", out), **{**KW, **kw})
        assert "\n" not in str(e.value)

    # another seed: other random SAM weights than the cache was built from
    refused(FeatureCacheError, "other SAM image-encoder weights", seed=1)
    # the config trains the cached tower
    trains = copy.deepcopy(cfg)
    trains["train"]["freeze"] = ["clip"]
    refused(ConfigError, "needs SAM's image encoder frozen", cfg=trains)
    # augmentation changes the image every epoch
    aug = copy.deepcopy(cfg)
    aug["train"]["augment"] = True
    refused(ConfigError, "without image augmentation", cfg=aug)
    # another model's SAM section
    other = copy.deepcopy(cfg)
    other["sam"]["decoder_heads"] = 4
    refused(FeatureCacheError, "another SAM section", cfg=other)
    # another dataset (same layout, other images)
    from sspsam.data import generate_refer

    root2 = tmp_path / "other"
    generate_refer(root2, "refcoco", n_images=12, seed=1)
    with pytest.raises(FeatureCacheError, match="another dataset"):
        train(cfg, root2, tmp_path / "r2", steps=1, ckpt_every=1, cached_features=out, **KW)
    refused(FeatureCacheError, "no feature cache", cache=tmp_path / "nowhere")
    # building into a folder that holds a different cache
    with pytest.raises(FeatureCacheError, match="for something else"):
        build_feature_cache(cfg, data_root, out, seed=KW["seed"], dtype="float16", shard_size=4, batch_size=2)


def test_cli_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, sspsam.cli.main, sspsam.cli.cache; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# SAM-MI (OVSS trainer): SAM frozen, random flip served by a mirrored view in the cache

SAM_MI_FROZEN = """base: sam-mi-tiny
train: {freeze: [sam]}
"""


@pytest.fixture(scope="module")
def semseg(tmp_path_factory):
    from sspsam.data.semseg import generate_semseg

    root = tmp_path_factory.mktemp("semseg")
    generate_semseg(root, n=4, size=96, seed=0, splits=("train",))
    cfg = root.parent / "sam-mi-frozen.yaml"
    cfg.write_text(SAM_MI_FROZEN)
    return root, cfg


def test_sam_mi_cached_loss_curve_equals_uncached(semseg, tmp_path, monkeypatch):
    """fp32 cache: the per-step losses of SAM-MI training equal the uncached run's to 1e-5, with the
    trainer's random flips drawn as before (both views of the cache are read)."""
    from sspsam.backbones.sam import SAMBackbone
    from sspsam.engine.train_ovss import build_ovss_feature_cache, train_ovss

    root, cfg = semseg
    kw = dict(steps=4, batch_size=2, seed=0, log_every=0, warmup=2, log=lambda m: None)
    plain = train_ovss(cfg, root, tmp_path / "plain", **kw)
    cache = tmp_path / "cache"
    info = build_ovss_feature_cache(cfg, root, cache, dtype="float32", shard_size=4, batch_size=2)
    assert info["rows"] == 8 and info["views"] == ["plain", "hflip"]
    rows = FeatureCache(cache)
    np.testing.assert_array_equal(rows[1].shape, rows[0].shape)
    assert np.abs(rows[1] - rows[0]).max() > 1e-3  # the mirrored view is another embedding
    used = []
    real = fc.FeatureCache.__getitem__
    monkeypatch.setattr(fc.FeatureCache, "__getitem__", lambda self, r: used.append(int(r)) or real(self, r))

    def never(*a, **k):
        raise AssertionError("the cached path ran SAM's image encoder")

    monkeypatch.setattr(SAMBackbone, "encode_image", never)
    cached = train_ovss(cfg, root, tmp_path / "cached", cached_features=cache, **kw)
    assert {r % 2 for r in used} == {0, 1}  # both views were trained on
    assert len(plain["losses"]) == len(cached["losses"]) == 4
    for a, b in zip(plain["losses"], cached["losses"]):
        assert b == pytest.approx(a, abs=1e-5, rel=0)


def test_sam_mi_cache_refusals(semseg, tmp_path):
    from sspsam.engine.train_ovss import build_ovss_feature_cache, train_ovss

    root, cfg = semseg
    cache = tmp_path / "cache"
    res = CliRunner().invoke(app, ["cache-features", str(cfg), "--data", str(root), "-o", str(cache), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "4 images x 2 views (plain, hflip)" in res.output and "float16" in res.output
    kw = dict(steps=1, batch_size=2, log_every=0, log=lambda m: None, cached_features=cache)
    with pytest.raises(FeatureCacheError, match="other SAM image-encoder weights") as e:
        train_ovss(cfg, root, tmp_path / "r", seed=1, **kw)  # another seed: other random SAM weights
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="nothing to cache"):
        build_ovss_feature_cache("escnet-tiny", root, tmp_path / "e")
    res = CliRunner().invoke(app, ["cache-features", "sam-mi-tiny", "--data", str(root), "-o", str(tmp_path / "t")])
    assert res.exit_code == 2 and "needs SAM's image encoder frozen" in res.output
    assert len(res.output.strip().splitlines()) == 1

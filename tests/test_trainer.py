"""The training loop: logs and checkpoints, bit-exact resume, corrupt-checkpoint errors."""

from __future__ import annotations

import json

import pytest
import torch

from sspsam.config import load_config
from sspsam.errors import CheckpointError
from sspsam.engine.trainer import train

KW = dict(batch_size=2, lr=1e-3, decoder_lr=1e-4, seed=3407, log_every=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from sspsam.data import generate_refer

    root = tmp_path_factory.mktemp("refcoco")
    generate_refer(root, "refcoco", n_images=6, seed=0)
    return root


@pytest.fixture(scope="module")
def cfg():
    c = load_config("ssp-sam-tiny")
    c["train"] = {"freeze": ["clip", "sam.image_encoder"], "warmup_steps": 2}
    return c


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_writes_log_checkpoints_and_model(cfg, data_root, tmp_path):
    from sspsam.predict.segmenter import Segmenter

    out = tmp_path / "run"
    res = train(cfg, data_root, out, steps=6, ckpt_every=3, **KW)
    assert res["step"] == 6
    recs = _log(out / "log.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in recs)
    assert (out / "last.pt").is_file() and (out / "model.pt").is_file()
    seg = Segmenter.from_pretrained(out / "model.pt")
    assert seg.model.image_size == 128
    # frozen towers are not copied into the training state
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 6 and not any(k.startswith(("clip.", "sam.image_encoder.")) for k in state["model"])


def test_resume_is_bit_exact(cfg, data_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg, data_root, a, steps=6, ckpt_every=3, **KW)
    train(cfg, data_root, b, steps=3, total_steps=6, ckpt_every=3, **KW)
    assert len(_log(b / "log.jsonl")) == 3
    # a stray line past the checkpoint (as after a crash) must not survive the resume
    with open(b / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 4, "total": -1.0}) + "\n")
    res = train(cfg, data_root, b, steps=6, ckpt_every=3, resume=True, **KW)
    assert [r["step"] for r in res["losses"]] == [4, 5, 6]

    la, lb = _log(a / "log.jsonl"), _log(b / "log.jsonl")
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(la, lb):
        assert set(ra) == set(rb)
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6), (ra["step"], k)

    sa = torch.load(a / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(b / "model.pt", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6), k


def test_corrupt_checkpoint_on_resume(cfg, data_root, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "last.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(cfg, data_root, out, steps=2, ckpt_every=1, resume=True, **KW)
    (out / "last.pt").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        train(cfg, data_root, out, steps=2, ckpt_every=1, resume=True, **KW)


def test_truncated_real_checkpoint(cfg, data_root, tmp_path):
    out = tmp_path / "t"
    train(cfg, data_root, out, steps=1, ckpt_every=1, **KW)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        train(cfg, data_root, out, steps=2, ckpt_every=1, resume=True, **KW)


def test_grad_accum_smoke(cfg, data_root, tmp_path):
    res = train(cfg, data_root, tmp_path / "ga", steps=2, ckpt_every=5, grad_accum=2, **KW)
    assert [r["step"] for r in res["losses"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in res["losses"])
    assert (tmp_path / "ga" / "last.pt").is_file()  # the final step always checkpoints


def test_bf16_smoke(cfg, data_root, tmp_path):
    res = train(cfg, data_root, tmp_path / "bf", steps=2, ckpt_every=5, precision="bf16", **KW)
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in res["losses"])

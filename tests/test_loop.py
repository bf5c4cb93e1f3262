"""The shared loop with a model it was not written for: any referring model returning SSP-SAM's
output dict trains through ReferringTask, resumes bit-exactly and can be stopped by ``on_step``."""

from __future__ import annotations

import json

import pytest
import torch

from sspsam.config import load_config
from sspsam.engine.loop import LoopOptions, fit
from sspsam.engine.tasks import load_task, train
from sspsam.engine.tasks.referring import ReferringTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyReferring(torch.nn.Module):
    """A phrase-conditioned per-pixel logit: no CLIP, no SAM, no box head."""

    image_size = 64

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(128, 8)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def tokenize(self, phrases: list[str]) -> torch.Tensor:
        return torch.tensor([[ord(c) % 128 for c in (p + " " * 16)[:16]] for p in phrases])

    def forward(self, images, tokens, valid_hw=None) -> dict:
        small = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
        logits = torch.einsum("bchw,bc->bhw", self.conv(small), self.embed(tokens).mean(1))
        return {"mask_logits": logits[:, None]}


class TinyTask(ReferringTask):
    def build(self, seed):
        torch.manual_seed(seed)
        return TinyReferring()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from sspsam.data import generate_refer

    root = tmp_path_factory.mktemp("refcoco")
    generate_refer(root, "refcoco", n_images=6, seed=0)
    return root


@pytest.fixture()
def cfg():
    c = load_config("ssp-sam-tiny")
    c["train"] = {"augment": False, "warmup_steps": 1}
    return c


def test_options_split_between_loop_and_task():
    loop, rest = LoopOptions.split({"steps": 3, "batch_size": 2, "lr": 1e-3, "dataset": "refcoco"})
    assert (loop.steps, loop.batch_size) == (3, 2) and rest == {"lr": 1e-3, "dataset": "refcoco"}


def test_any_referring_model_trains_and_resumes_bit_exactly(cfg, data_root, tmp_path):
    opts = dict(batch_size=2, seed=1, total_steps=4, ckpt_every=1, tensorboard=False)
    whole = fit(TinyTask(cfg, data_root, lr=1e-2), tmp_path / "a", LoopOptions(steps=4, **opts))
    fit(TinyTask(cfg, data_root, lr=1e-2), tmp_path / "b", LoopOptions(steps=2, **opts))
    rest = fit(TinyTask(cfg, data_root, lr=1e-2), tmp_path / "b", LoopOptions(steps=4, resume=True, **opts))
    assert [r["total"] for r in rest["losses"]] == [r["total"] for r in whole["losses"]][2:]
    assert {"dice", "focal", "total", "lr", "decoder_lr"} <= set(whole["losses"][0]) and "box_l1" not in whole["losses"][0]
    sa, sb = whole["module"].state_dict(), rest["module"].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    logged = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]


def test_on_step_stops_the_run_and_saves_it(cfg, data_root, tmp_path):
    res = train(TinyTask, cfg, data_root, tmp_path / "r", steps=5, batch_size=2, ckpt_every=10, tensorboard=False,
                lr=1e-2, on_step=lambda rec: rec["step"] == 2)
    assert res["step"] == 2 and torch.load(tmp_path / "r" / "last.pt", weights_only=False)["step"] == 2


def test_a_task_is_found_by_its_lazy_path():
    assert load_task("sspsam.engine.tasks.referring:ReferringTask") is ReferringTask
    from sspsam.engine.tasks.ovss import OVSSTask

    assert load_task("sspsam.engine.tasks.ovss:OVSSTask") is OVSSTask

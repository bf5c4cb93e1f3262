"""Models named on the Hugging Face Hub (``hf-hub:OWNER/REPO[/PATH][@REVISION]``), against a local
stand-in of the Hub's HTTP API on 127.0.0.1 (``tests/helpers/hub_server.py``) with ``HF_ENDPOINT``
pointed at it: download once, answer as the bundled model, answer again offline with the server
gone; every failure one `error:` line and nothing half-written in the cache; ``push`` stages the
files and card it hands to huggingface_hub, and those files load back bit for bit."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import sspsam.io.hub as hub
from sspsam.cli.main import app
from tests.helpers.hub_server import HubServer

runner = CliRunner()
BUNDLED = Path(str(resources.files("sspsam") / "assets" / "shapes-demo.pt"))
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
KNOWN = Path(__file__).resolve().parents[1] / "examples" / "shapes_blue_circle.png"


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A served shapes-demo repository, an empty hub cache and an empty sspsam cache."""
    repos = tmp_path / "repos"
    (repos / "shapes-demo").mkdir(parents=True)
    shutil.copyfile(BUNDLED, repos / "shapes-demo" / "model.pt")
    (repos / "shapes-demo" / "README.md").write_text("# shapes-demo\n")
    (repos / "two").mkdir()
    for sub in ("output/refcoco/224", "output/grefcoco/224"):
        (repos / "two" / sub).mkdir(parents=True)
        (repos / "two" / sub / "checkpoint_best_miou.pth").write_bytes(b"x" * 2048)
    (repos / "empty").mkdir()
    (repos / "empty" / "README.md").write_text("nothing\n")
    server = HubServer({"local/shapes-demo": repos / "shapes-demo", "local/two": repos / "two", "local/empty": repos / "empty"})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("SSPSAM_HOME", str(tmp_path / "sspsam-home"))
    monkeypatch.delenv("SSPSAM_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with server:
        yield server, tmp_path


def _cache_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "hf-cache"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()) if root.exists() else []


def _error(result, needle: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    return lines[0]


def test_names_parse_and_malformed_names_are_refused():
    assert hub.parse("hf-hub:wayneicloud/SSP-SAM") == hub.HubName("wayneicloud/SSP-SAM")
    got = hub.parse("hf-hub:wayneicloud/SSP-SAM/output/grefcoco/224/checkpoint_best_miou.pth@v1.0")
    assert got == hub.HubName("wayneicloud/SSP-SAM", "output/grefcoco/224/checkpoint_best_miou.pth", "v1.0")
    assert str(got) == "hf-hub:wayneicloud/SSP-SAM/output/grefcoco/224/checkpoint_best_miou.pth@v1.0"
    for bad in ("hf-hub:", "hf-hub:justone", "hf-hub:a/b/../c.pt", "hf-hub:a//b", "hf-hub:a/b@", "hf-hub:a b/c", "hf-hub:/x/y"):
        with pytest.raises(hub.HubError, match="malformed hub name"):
            hub.parse(bad)


def test_segment_downloads_once_then_answers_offline_with_the_server_gone(hub_env, tmp_path):
    server, root = hub_env
    out = tmp_path / "out"
    r = runner.invoke(app, ["segment", str(EXAMPLE), "the blue circle", "-m", "hf-hub:local/shapes-demo", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert server.downloads["model.pt"] == 1
    mask = np.array(Image.open(out / "shapes.segment.mask0.png")) > 0
    r = runner.invoke(app, ["segment", str(EXAMPLE), "the blue circle", "-m", "shapes-demo", "-o", str(tmp_path / "bundled")])
    assert r.exit_code == 0, r.output
    assert (mask == (np.array(Image.open(tmp_path / "bundled" / "shapes.segment.mask0.png")) > 0)).all()  # as the bundled model
    known = np.array(Image.open(KNOWN).convert("L")) > 127  # the generator's mask of the blue circle
    assert (mask & known).sum() / (mask | known).sum() >= 0.9
    assert json.loads((out / "shapes.segment.json").read_text())["model"] == "hf-hub:local/shapes-demo"
    # the cached file is the served file, bit for bit
    cached = next((root / "hf-cache").rglob("snapshots/*/model.pt"))
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == hashlib.sha256(BUNDLED.read_bytes()).hexdigest()
    server.stop()
    out2 = tmp_path / "out2"
    r = runner.invoke(app, ["segment", str(EXAMPLE), "the blue circle", "-m", "hf-hub:local/shapes-demo", "--offline", "-o", str(out2)])
    assert r.exit_code == 0, r.output
    assert (np.array(Image.open(out2 / "shapes.segment.mask0.png")) == np.array(Image.open(out / "shapes.segment.mask0.png"))).all()
    # offline, an uncached repository names the cache it looked in
    r = runner.invoke(app, ["segment", str(EXAMPLE), "x", "-m", "hf-hub:local/other", "--offline", "-o", str(out2)])
    assert str(root / "hf-cache") in _error(r, "downloads are off")


def test_failures_are_one_line_and_leave_nothing_in_the_cache(hub_env, tmp_path):
    server, root = hub_env
    out = tmp_path / "out"

    def seg(model):
        return runner.invoke(app, ["segment", str(EXAMPLE), "the blue circle", "-m", model, "-o", str(out)])

    _error(seg("hf-hub:local"), "malformed hub name")
    _error(seg("hf-hub:local/missing"), "no repository local/missing")
    _error(seg("hf-hub:local/empty"), "holds no checkpoint file")
    line = _error(seg("hf-hub:local/two"), "holds 2 checkpoints")
    assert "output/grefcoco/224/checkpoint_best_miou.pth (2.0 KB)" in line and "output/refcoco/224/checkpoint_best_miou.pth" in line
    _error(seg("hf-hub:local/shapes-demo/nope.pt"), "has no file 'nope.pt'")
    _error(seg("hf-hub:local/shapes-demo@v9"), "no revision 'v9'")
    assert _cache_files(root) == [] or all("model.pt" not in f for f in _cache_files(root))
    server.faults["model.pt"] = "get404"  # the metadata answers, the download 404s
    _error(seg("hf-hub:local/shapes-demo"), "has no file 'model.pt'")
    assert not [f for f in _cache_files(root) if "/blobs/" in f or "/snapshots/" in f]
    server.faults["model.pt"] = "corrupt"  # other bytes than the advertised sha256
    _error(seg("hf-hub:local/shapes-demo"), "sha256")
    assert not [f for f in _cache_files(root) if "/blobs/" in f or "/snapshots/" in f]
    assert not out.exists() or not any(out.iterdir())
    del server.faults["model.pt"]
    r = runner.invoke(app, ["weights", "fetch", "hf-hub:local/shapes-demo", "-q"])
    assert r.exit_code == 0 and r.stdout.strip().endswith("model.pt"), r.output
    r = runner.invoke(app, ["weights", "list"])
    assert r.exit_code == 0 and "hf-hub:local/shapes-demo/model.pt" in r.stdout, r.output


def test_push_stages_checkpoint_and_card_that_load_back_bit_for_bit(hub_env, tmp_path, monkeypatch):
    """The upload protocol (preupload, LFS/xet transfer, commit) is huggingface_hub's; what sspsam
    owns is what it hands over. Those exact files are captured, served as a repository, and loaded."""
    import huggingface_hub

    server, root = hub_env
    run = tmp_path / "runs" / "demo"
    (run / "eval").mkdir(parents=True)
    shutil.copyfile(BUNDLED, run / "model.pt")
    (run / "eval" / "metrics.json").write_text(json.dumps(
        {"model": "x", "dataset": "grefcoco", "split": "val", "metrics": {"gIoU": 0.8123, "cIoU": 0.79, "n": 40}}))
    handed: dict[str, bytes] = {}
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw.get("exist_ok")))

    def upload_folder(self, *, repo_id, folder_path, path_in_repo="", revision=None, commit_message=None, **kw):
        calls.append(("upload_folder", repo_id, path_in_repo, commit_message))
        for f in Path(folder_path).rglob("*"):
            handed[f.relative_to(folder_path).as_posix()] = f.read_bytes()
        return type("Info", (), {"commit_url": f"{server.url}/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    r = runner.invoke(app, ["push", str(run), "hf-hub:me/pushed"])
    assert r.exit_code == 0, r.output
    assert calls == [("create_repo", "me/pushed", True), ("upload_folder", "me/pushed", "", "Upload sspsam checkpoint")]
    assert sorted(handed) == ["README.md", "model.pt"] and handed["model.pt"] == BUNDLED.read_bytes()
    card = handed["README.md"].decode()
    assert "library_name: sspsam" in card and "hf-hub:me/pushed" in card and "name: shapes-demo" in card
    assert "| grefcoco | val |" in card and "gIoU 81.23" in card and "trained_on: generated shape scenes" in card
    assert hashlib.sha256(BUNDLED.read_bytes()).hexdigest() in card
    # served as a repository, the pushed files load back with the same weights, bit for bit
    pushed = tmp_path / "repos" / "pushed"
    pushed.mkdir()
    for name, data in handed.items():
        (pushed / name).write_bytes(data)
    server.repos["me/pushed"] = pushed
    from sspsam.predict.segmenter import Segmenter

    got = Segmenter.from_pretrained("hf-hub:me/pushed", device="cpu", dtype=torch.float32)
    ref = torch.load(BUNDLED, map_location="cpu", weights_only=True)["state_dict"]
    sd = got.model.state_dict()
    assert set(ref) <= set(sd) and all(torch.equal(sd[k].to(ref[k].dtype), ref[k]) for k in ref)
    # refusals: not an sspsam checkpoint, nothing there
    (tmp_path / "bare.pt").write_bytes((tmp_path / "runs" / "demo" / "model.pt").read_bytes()[:0] or b"")
    _error(runner.invoke(app, ["push", str(tmp_path / "nowhere"), "hf-hub:me/x"]), "nothing to push")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    _error(runner.invoke(app, ["push", str(tmp_path / "plain.pt"), "hf-hub:me/x"]), "not an sspsam checkpoint")

"""The `sspsam` command line's traps, each one a real invocation (in-process with CliRunner where
possible): every error is one `error:` line on stderr with exit code 2, options are never taken
as phrases, output names are fixed per command, and `--help` does not load torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sspsam import __version__
from sspsam.cli.main import app
from sspsam.data.shapes import make_scene

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _error_line(result, needle: str) -> str:
    """The single stderr line of a failed run; checks the shape every error must have."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # one message, never two, never a box or a traceback
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(make_scene(3, width=96, height=72).render()).save(path)
    return path


def test_version():
    r = _run("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"sspsam {__version__}"


def test_help_does_not_load_torch_or_numpy():
    # `sspsam --help` must answer at once: the model stack loads only when a command runs.
    code = ("import sys; from sspsam.cli.main import app; "
            "from typer.main import get_command; get_command(app); "
            "print(sorted(m for m in ('torch', 'numpy', 'PIL', 'sspsam.io.weights') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.strip() == "[]"
    r = _run("segment", "--help")
    assert r.exit_code == 0 and "--device" in r.stdout and "auto" in r.stdout and "segment.json" in r.stdout


def test_phrase_that_is_an_image_file_points_to_batch(scene_png):
    line = _error_line(_run("segment", scene_png, scene_png), "is a file, not a phrase")
    assert "sspsam batch" in line


@pytest.mark.parametrize("args", [["-o"], ["dog", "-o"], ["--"], ["dog", "-"], ["dog", " --model"]])
def test_option_like_words_are_not_phrases_before_double_dash(scene_png, args, tmp_path):
    r = runner.invoke(app, ["segment", str(scene_png), *args], catch_exceptions=False)
    _error_line(r, "")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args", [["--", "-o"], ["--", "--model=x"], ["dog", "--", "-m", "--help"]])
def test_words_after_double_dash_are_phrases(scene_png, args, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["segment", str(scene_png), "-o", str(out), *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    phrases = [a for a in args if a not in ("--",)]
    assert [r["phrase"] for r in json.loads(next(out.glob("*.segment.json")).read_text())["results"]] == phrases


def test_unavailable_and_malformed_devices(scene_png, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _error_line(_run("segment", scene_png, "dog", "--device", "cuda"), "device 'cuda' is not available")
    _error_line(_run("ovss", scene_png, "--device", "cuda:3"), "is not available")
    _error_line(_run("segment", scene_png, "dog", "--device", "gpu0"), "unknown device 'gpu0'")


def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    import torch

    from sspsam.predict.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["[/red].png", "[/]x.png", "[bold]a[/bold].png"])
def test_markup_in_file_names_is_printed_as_is(tmp_path, name):
    missing = tmp_path / name
    line = _error_line(_run("segment", missing, "dog"), "image not found")
    assert name in line
    bad = tmp_path / name
    bad.parent.mkdir(parents=True, exist_ok=True)  # "[/red].png" is "red].png" in a folder "["
    bad.write_bytes(b"not an image")
    line = _error_line(_run("ovss", bad, "-c", "a,b"), name)


def test_long_and_unreadable_file_names(tmp_path, scene_png):
    _error_line(_run("segment", tmp_path / ("x" * 300 + ".png"), "dog"), "file name is too long")
    locked = tmp_path / "locked.png"
    locked.write_bytes(scene_png.read_bytes())
    locked.chmod(0)
    real_open = open

    def deny(path, *a, **k):  # root ignores permission bits, so deny the read as the kernel would
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    import sspsam.cli.common

    try:
        with pytest.MonkeyPatch.context() as mp:
            if os.access(locked, os.R_OK):
                mp.setattr(sspsam.cli.common, "open", deny, raising=False)
            _error_line(_run("segment", locked, "dog"), "permission denied")
    finally:
        locked.chmod(0o644)


def test_output_that_is_a_file(tmp_path, scene_png):
    blocker = tmp_path / "out"
    blocker.write_text("x")
    _error_line(_run("segment", scene_png, "dog", "-o", blocker), "is not a folder")


def test_usage_errors_are_one_line():
    _error_line(_run("segment"), "Missing argument")
    _error_line(_run("no-such-command"), "No such command")
    _error_line(_run("segment", "x.png", "dog", "--no-such-option"), "No such option")


def test_output_names_are_per_command_and_fixed(tmp_path, scene_png):
    out = tmp_path / "out"
    one = _run("segment", scene_png, "the red circle", "-o", out)
    assert one.exit_code == 0, one.output
    first = {p.name for p in out.iterdir()}
    assert first == {"scene.segment.json", "scene.segment.overlay.png", "scene.segment.mask0.png"}
    two = _run("segment", scene_png, "the red circle", "the blue square", "-o", out)
    assert two.exit_code == 0, two.output
    assert {p.name for p in out.iterdir()} == first | {"scene.segment.mask1.png"}  # same names, one more mask
    ov = _run("ovss", scene_png, "-c", "background,red,blue", "-o", out)
    assert ov.exit_code == 0, ov.output
    assert {p.name for p in out.iterdir()} == first | {"scene.segment.mask1.png", "scene.ovss.json",
                                                       "scene.ovss.labels.png", "scene.ovss.overlay.png"}
    seg = json.loads((out / "scene.segment.json").read_text())
    assert [r["mask_file"] for r in seg["results"]] == ["scene.segment.mask0.png", "scene.segment.mask1.png"]
    assert json.loads((out / "scene.ovss.json").read_text())["classes"] == ["background", "red", "blue"]


def test_very_long_image_name_gets_a_shortened_output_name(tmp_path):
    img = tmp_path / ("s" * 240 + ".png")
    Image.fromarray(make_scene(1, width=64, height=48).render()).save(img)
    out = tmp_path / "o"
    r = _run("segment", img, "the red circle", "-o", out)
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 3 and all(len(n.encode()) <= 255 for n in names)


def test_models_lists_what_each_command_accepts(tmp_path, monkeypatch):
    monkeypatch.setenv("SSPSAM_HOME", str(tmp_path))
    r = _run("models")
    assert r.exit_code == 0, r.output
    seg, ovss = r.stdout.split("sspsam ovss --model")
    assert "shapes-demo" in seg and "ssp-sam-vitb" in seg and "zeroshot" in seg and "ovss-shapes-demo" not in seg
    assert "ovss-shapes-demo" in ovss and "escnet-vitb" in ovss and "sam-mi-vitb" in ovss and "zeroshot" in ovss
    assert "hf-hub:wayneicloud/SSP-SAM" in seg and "hf-hub" not in ovss  # the released checkpoints are named
    zeroshot = next(line for line in seg.splitlines() if line.split()[:1] == ["zeroshot"])
    assert "clip-vit-b16 not cached" in zeroshot and "sam-vit-b not cached" in zeroshot
    (tmp_path / "weights").mkdir()
    with open(tmp_path / "weights" / "sam_vit_b_01ec64.pth", "wb") as f:
        f.truncate(375_042_383)  # the registered size (a sparse file): `models` checks presence and size only
    r = _run("models")
    zeroshot = next(line for line in r.stdout.splitlines() if line.split()[:1] == ["zeroshot"])
    assert "sam-vit-b cached" in zeroshot


def test_weights_errors_exit_2_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SSPSAM_HOME", str(tmp_path))
    _error_line(_run("weights", "fetch", "nope"), "unknown weights 'nope'")
    _error_line(_run("weights", "fetch", "sam-vit-b", "--url", "http://[::1"), "malformed URL")


def test_found_never_has_an_empty_mask(monkeypatch):
    # A mask that passes the low-resolution rules but vanishes at the original size (a sliver
    # lost in resizing) must come back as "no target", never as "found" with nothing drawn.
    import sspsam.predict.segmenter as predictor

    seg = predictor.Segmenter.from_pretrained("shapes-demo")
    seg.no_target_min_pixels = 0  # the 512² rule lets everything through ...
    seg.no_target_prob = 1.01  # ... and so does the no-target head
    real = predictor.unletterbox_logits

    def vanish_first(low, box):  # ... but the first phrase's mask is empty at the original size
        full = real(low, box).clone()
        full[0] = -1.0
        return full

    monkeypatch.setattr(predictor, "unletterbox_logits", vanish_first)
    res = seg.segment(make_scene(5).render(), ["the red circle", "the blue square"])
    assert res.no_target[0] and not res.masks[0].any()
    assert all(n or m.any() for m, n in zip(res.masks, res.no_target))
    assert res.to_json()["results"][0]["no_target"] is True


def test_a_failed_run_leaves_no_output(tmp_path, scene_png):
    out = tmp_path / "out"
    _error_line(_run("segment", scene_png, "dog", "-o", out, "--model", "no-such-model"), "unknown model 'no-such-model'")
    _error_line(_run("ovss", scene_png, "-o", out, "--model", "shapes-demo"), "not an OVSS model: use it with `sspsam segment`")
    _error_line(_run("segment", scene_png, "dog", "-o", out, "--model", "ovss-shapes-demo"), "use it with `sspsam ovss`")
    assert not out.exists()


def test_a_phrase_naming_a_non_image_file_is_still_a_phrase(tmp_path, scene_png, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dog").write_text("a file that happens to share the phrase's name")
    r = _run("segment", scene_png, "dog", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output


def test_shared_options_exist_alike_on_every_command():
    """--device / --offline / --threads (and --quantize / --dtype where a model answers requests)
    mean the same on every command that loads a model: same spelling, same default, same help."""
    import typer.main

    from sspsam.cli import common

    root = typer.main.get_command(app)

    def params(*path):
        cmd = root
        for name in path:
            cmd = cmd.commands[name]
        return {opt: p for p in cmd.params for opt in getattr(p, "opts", [])}

    inference = [("segment",), ("ovss",), ("batch",), ("track",), ("serve",), ("evaluate",)]
    everything = inference + [("train",), ("cache-features",)]
    for path in everything:
        got = params(*path)
        for opt, help_text in (("--device", common.DEVICE_HELP), ("--offline", common.OFFLINE_HELP),
                               ("--threads", common.THREADS_HELP)):
            assert opt in got and got[opt].help.startswith(help_text), (path, opt)
        assert got["--device"].default == "auto" and got["--offline"].default is False and got["--threads"].default is None
    for path in inference:
        got = params(*path)
        assert got["--quantize"].help == common.QUANTIZE_HELP and got["--quantize"].default == "none", path
        assert got["--dtype"].help.startswith(common.DTYPE_HELP) and got["--dtype"].default == "auto", path
    assert "--offline" in params("export", "onnx")

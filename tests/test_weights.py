"""The weights channel against a real HTTP server on 127.0.0.1 serving small files.

Every test gets its own SSPSAM_HOME and its own copy of the registry, so nothing touches the
user's cache and fake specs registered here do not leak into other tests.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sspsam.io.weights as weights
import sspsam.io.weights_registry as weights_registry
from sspsam.cli.weights import app
from sspsam.io.weights import ChecksumError, DownloadError, WeightSpec

BODY = bytes(range(256)) * 40 + b"tail"  # 10244 bytes, more than one read of the server's socket
OTHER = b"not the checkpoint" * 100


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Server:
    """What the handler serves and what it saw."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    ranges: bool = True  # honour Range with 206
    cut_after: int | None = None  # announce the full length, send this many bytes, close
    requests: list[dict[str, str]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    state: Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        state = self.state
        state.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and state.ranges:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if state.cut_after is not None:
            self.wfile.write(payload[: state.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(files={"/w.pt": BODY})
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SSPSAM_HOME", str(tmp_path / "home"))
    registry = dict(weights.REGISTRY)  # the registry module's functions read their own global
    monkeypatch.setattr(weights_registry, "REGISTRY", registry)
    monkeypatch.setattr(weights, "REGISTRY", registry)
    return tmp_path / "home"


def fake(sha256: str | None = sha(BODY), size: int | None = len(BODY), url: str | None = None) -> WeightSpec:
    spec = WeightSpec(
        name="tiny", url=url, sha256=sha256, size=size, filename="tiny.pt",
        licence="MIT", kind="sspsam", description="test file",
    )
    weights.register(spec)
    return spec


def cache_files(home: Path) -> list[str]:
    folder = home / "weights"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- registry and paths ---------------------------------------------------------------------


def test_registry_holds_the_official_checkpoints() -> None:
    assert set(weights.REGISTRY) >= {
        "sam-vit-b", "sam-vit-l", "sam-vit-h", "mobile-sam", "clip-vit-b16", "clip-vit-l14-336",
    }
    for spec in weights.REGISTRY.values():
        assert spec.url and spec.url.startswith("https://")
        assert spec.url.rsplit("/", 1)[1] == spec.filename
        assert spec.sha256 is not None  # all six have published digests
    for name in ("clip-vit-b16", "clip-vit-l14-336"):  # OpenAI names the folder by the file's sha256
        spec = weights.REGISTRY[name]
        assert spec.url.split("/")[-2] == spec.sha256


def test_spec_rejects_bad_entries() -> None:
    with pytest.raises(ValueError, match="kind"):
        WeightSpec("x", None, None, None, "x.pt", "MIT", "bert", "")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sha256"):
        WeightSpec("x", None, "ABC", None, "x.pt", "MIT", "sam", "")
    with pytest.raises(ValueError, match="filename"):
        WeightSpec("x", None, None, None, "../x.pt", "MIT", "sam", "")


def test_paths_follow_sspsam_home(home: Path) -> None:
    assert weights.weights_home() == home
    assert weights.local_path("sam-vit-b") == home / "weights" / "sam_vit_b_01ec64.pth"
    assert weights.find("sam-vit-b") is None
    with pytest.raises(weights.UnknownWeightsError, match="sam-vit-b"):
        weights.local_path("sam-vit-x")


def test_require_names_both_commands() -> None:
    with pytest.raises(weights.WeightsMissingError) as info:
        weights.require("mobile-sam")
    message = str(info.value)
    assert "sspsam weights fetch mobile-sam" in message
    assert "sspsam weights import mobile-sam /path/to/mobile_sam.pt" in message
    assert "SSPSAM_HOME" in message


# --- fetch ------------------------------------------------------------------------------------


def test_fetch_verifies_and_caches(server: Server, home: Path) -> None:
    fake()
    path = weights.fetch("tiny", url=server.base + "/w.pt", progress=False)
    assert path == home / "weights" / "tiny.pt"
    assert path.read_bytes() == BODY
    assert cache_files(home) == ["tiny.pt", "tiny.pt.sha256"]
    assert weights.find("tiny") == path == weights.require("tiny")
    assert weights.verify("tiny")
    assert weights.status("tiny") == "verified"
    # Present already: no second download.
    weights.fetch("tiny", url=server.base + "/w.pt", progress=False)
    assert len(server.requests) == 1


def test_fetch_uses_the_registry_url_and_shows_progress(server: Server, home: Path) -> None:
    fake(url=server.base + "/w.pt")
    assert weights.fetch("tiny", progress=True).read_bytes() == BODY


def test_checksum_mismatch_leaves_nothing(server: Server, home: Path) -> None:
    fake(sha256=sha(OTHER), size=None)
    with pytest.raises(ChecksumError) as info:
        weights.fetch("tiny", url=server.base + "/w.pt", progress=False)
    assert sha(OTHER) in str(info.value) and sha(BODY) in str(info.value)
    assert cache_files(home) == []


def test_oversized_download_is_refused(server: Server, home: Path) -> None:
    fake(size=len(BODY) - 10)
    with pytest.raises(ChecksumError, match="more than"):
        weights.fetch("tiny", url=server.base + "/w.pt", progress=False)
    assert cache_files(home) == []


def test_resume_sends_range_and_completes(server: Server, home: Path) -> None:
    fake()
    part = home / "weights" / "tiny.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BODY[:4000])
    path = weights.fetch("tiny", url=server.base + "/w.pt", progress=False)
    assert path.read_bytes() == BODY
    assert [r.get("range") for r in server.requests] == ["bytes=4000-"]
    assert not part.exists()


def test_restarts_cleanly_when_server_ignores_range(server: Server, home: Path) -> None:
    server.ranges = False
    fake()
    part = home / "weights" / "tiny.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 4000)  # wrong bytes: they must be thrown away, not kept
    assert weights.fetch("tiny", url=server.base + "/w.pt", progress=False).read_bytes() == BODY
    assert server.requests[0].get("range") == "bytes=4000-"


def test_refused_range_starts_over(server: Server, home: Path) -> None:
    fake(size=None)  # size unknown, so a .part as long as the file cannot be recognised as done
    part = home / "weights" / "tiny.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BODY)
    assert weights.fetch("tiny", url=server.base + "/w.pt", progress=False).read_bytes() == BODY
    assert [r.get("range") for r in server.requests] == [f"bytes={len(BODY)}-", None]


def test_complete_part_is_finished_without_a_request(server: Server, home: Path) -> None:
    fake()  # e.g. the last run was stopped between the last byte and the rename
    part = home / "weights" / "tiny.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BODY)
    assert weights.fetch("tiny", url=server.base + "/w.pt", progress=False).read_bytes() == BODY
    assert server.requests == []


def test_broken_connection_keeps_part_then_resumes(server: Server, home: Path) -> None:
    fake()
    server.cut_after = 3000
    url = server.base + "/w.pt"
    with pytest.raises(DownloadError) as info:
        weights.fetch("tiny", url=url, progress=False)
    assert url in str(info.value)
    part = home / "weights" / "tiny.pt.part"
    assert part.read_bytes() == BODY[:3000]
    assert not (home / "weights" / "tiny.pt").exists()
    server.cut_after = None
    assert weights.fetch("tiny", url=url, progress=False).read_bytes() == BODY
    assert server.requests[-1].get("range") == "bytes=3000-"


def test_http_error_names_url_and_status(server: Server) -> None:
    fake()
    url = server.base + "/missing.pt"
    with pytest.raises(DownloadError, match=re.escape(url) + ".*404"):
        weights.fetch("tiny", url=url, progress=False)


def test_unreachable_server_is_a_download_error() -> None:
    fake()
    with pytest.raises(DownloadError, match="127.0.0.1:9"):
        weights.fetch("tiny", url="http://127.0.0.1:9/w.pt", progress=False)


def test_unknown_hash_is_recorded_and_then_enforced(server: Server, home: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    fake(sha256=None, size=None)
    path = weights.fetch("tiny", url=server.base + "/w.pt", progress=False)
    assert "UNVERIFIED" in capsys.readouterr().err
    assert (home / "weights" / "tiny.pt.sha256").read_text().split()[0] == sha(BODY)
    assert weights.status("tiny") == "recorded"
    assert weights.verify("tiny")
    other = tmp_path / "other.pt"
    other.write_bytes(OTHER)
    with pytest.raises(ChecksumError, match="recorded"):
        weights.import_file("tiny", other)
    assert path.read_bytes() == BODY
    path.write_bytes(OTHER)  # damaged after the download
    assert not weights.verify("tiny")


# --- import -----------------------------------------------------------------------------------


def test_import_good_file(tmp_path: Path, home: Path) -> None:
    fake()
    src = tmp_path / "downloaded.pt"
    src.write_bytes(BODY)
    path = weights.import_file("tiny", src)
    assert path.read_bytes() == BODY
    assert cache_files(home) == ["tiny.pt", "tiny.pt.sha256"]
    assert weights.status("tiny") == "verified"


@pytest.mark.parametrize("data", [OTHER, BODY[:-1] + b"X"], ids=["wrong-size", "wrong-bytes"])
def test_import_bad_file_leaves_nothing(tmp_path: Path, home: Path, data: bytes) -> None:
    fake()
    src = tmp_path / "bad.pt"
    src.write_bytes(data)
    with pytest.raises(ChecksumError):
        weights.import_file("tiny", src)
    assert cache_files(home) == []


def test_verify_marks_a_damaged_file_corrupt(tmp_path: Path) -> None:
    fake()
    src = tmp_path / "good.pt"
    src.write_bytes(BODY)
    path = weights.import_file("tiny", src)
    path.write_bytes(BODY[:-1] + b"X")
    assert not weights.verify("tiny")
    assert weights.status("tiny") == "corrupt"


def test_list_weights_rows(tmp_path: Path, home: Path) -> None:
    fake()
    src = tmp_path / "good.pt"
    src.write_bytes(BODY)
    weights.import_file("tiny", src)
    rows = {row["name"]: row for row in weights.list_weights()}
    assert rows["tiny"] == {
        "name": "tiny", "kind": "sspsam", "size": len(BODY), "present": True,
        "path": str(home / "weights" / "tiny.pt"), "status": "verified", "licence": "MIT",
        "description": "test file",
    }
    assert rows["sam-vit-h"]["present"] is False and rows["sam-vit-h"]["status"] == "missing"


# --- CLI --------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_list_shows_every_name() -> None:
    fake()
    result = runner.invoke(app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("sam-vit-b", "sam-vit-h", "mobile-sam", "clip-vit-l14-336", "tiny"):
        assert name in result.output
    assert "missing" in result.output


def test_cli_import_then_path_and_verify(tmp_path: Path, home: Path) -> None:
    fake()
    src = tmp_path / "good.pt"
    src.write_bytes(BODY)
    result = runner.invoke(app, ["import", "tiny", str(src)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(home / "weights" / "tiny.pt")
    assert runner.invoke(app, ["path", "tiny"]).stdout.strip() == str(home / "weights" / "tiny.pt")
    result = runner.invoke(app, ["verify", "tiny"])
    assert result.exit_code == 0 and "OK" in result.stdout


def test_cli_import_bad_file_is_one_line_error(tmp_path: Path, home: Path) -> None:
    fake()
    src = tmp_path / "bad.pt"
    src.write_bytes(OTHER)
    result = runner.invoke(app, ["import", "tiny", str(src)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert cache_files(home) == []


def test_cli_fetch_errors(server: Server) -> None:
    fake()
    url = server.base + "/missing.pt"
    result = runner.invoke(app, ["fetch", "tiny", "--url", url])
    assert result.exit_code == 2
    assert url in result.stderr and "404" in result.stderr
    result = runner.invoke(app, ["fetch", "no-such-weights"])
    assert result.exit_code == 2 and "sam-vit-b" in result.stderr


def test_cli_fetch_downloads(server: Server, home: Path) -> None:
    fake()
    result = runner.invoke(app, ["fetch", "tiny", "--url", server.base + "/w.pt"])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()).read_bytes() == BODY


def test_cli_path_and_verify_of_missing_weights_say_how_to_get_them() -> None:
    for command in ("path", "verify"):
        result = runner.invoke(app, [command, "sam-vit-b"])
        assert result.exit_code == 2
        assert "sspsam weights fetch sam-vit-b" in result.stderr
        assert "sspsam weights import sam-vit-b" in result.stderr


# --- first use: from_pretrained and the CLI download what they need ---------------------------


def _tiny_backbones(tmp_path: Path) -> tuple[dict, dict[str, bytes]]:
    """The tiny zeroshot config pointing at two registered test weights, and those files' bytes."""
    import io

    import torch

    from sspsam.models.build import build_model
    from sspsam.config import load_config

    torch.manual_seed(1)
    cfg = load_config("zeroshot-tiny")
    model = build_model(cfg)
    files = {}
    for part, sd in (("clip", model.clip.model.state_dict()), ("sam", model.sam.state_dict())):
        buf = io.BytesIO()
        torch.save(sd, buf)
        files[part] = buf.getvalue()
        weights.register(WeightSpec(
            name=f"tiny-{part}", url="https://example.invalid/never-used", sha256=sha(files[part]),
            size=len(files[part]), filename=f"tiny-{part}.pt", licence="MIT", kind="clip" if part == "clip" else "sam",
            description="test backbone",
        ))
        cfg[part]["weights"] = f"tiny-{part}"
    return cfg, files


def test_first_use_downloads_from_the_mirror_and_loads(server: Server, home: Path, tmp_path: Path, monkeypatch) -> None:
    from sspsam.models.build import load_zeroshot

    cfg, files = _tiny_backbones(tmp_path)
    server.files.update({f"/mirror/tiny-{p}.pt": b for p, b in files.items()})
    monkeypatch.setenv("SSPSAM_WEIGHTS_MIRROR", server.base + "/mirror/")  # registry URLs overridden
    model = load_zeroshot(cfg)
    assert cache_files(home) == ["tiny-clip.pt", "tiny-clip.pt.sha256", "tiny-sam.pt", "tiny-sam.pt.sha256"]
    import torch

    want = torch.load(home / "weights" / "tiny-sam.pt")
    got = model.sam.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    n = len(server.requests)
    weights.ensure_all(["tiny-clip", "tiny-sam"])  # cached now: no second download
    assert len(server.requests) == n


def test_first_use_resumes_a_partial_download(server: Server, home: Path, monkeypatch) -> None:
    fake(url=server.base + "/w.pt")
    server.cut_after = 3000  # the connection drops after 3000 bytes
    with pytest.raises(weights.WeightsMissingError) as info:
        weights.ensure("tiny", progress=False)
    msg = str(info.value)
    assert "sspsam weights fetch tiny" in msg and "sspsam weights import tiny /path/to/tiny.pt" in msg
    assert (home / "weights" / "tiny.pt.part").stat().st_size == 3000
    server.cut_after = None
    path = weights.ensure("tiny", progress=False)
    assert path.read_bytes() == BODY
    assert server.requests[-1]["range"] == "bytes=3000-"  # resumed, not restarted
    assert cache_files(home) == ["tiny.pt", "tiny.pt.sha256"]


def test_first_use_hash_mismatch_caches_nothing(server: Server, home: Path) -> None:
    fake(url=server.base + "/w.pt", sha256=sha(OTHER))
    with pytest.raises(ChecksumError, match="sha256"):
        weights.ensure("tiny", progress=False)
    assert cache_files(home) == []  # neither the file nor a partial one


def test_offline_names_the_commands_and_downloads_nothing(server: Server, home: Path, monkeypatch) -> None:
    fake(url=server.base + "/w.pt")
    monkeypatch.setenv("SSPSAM_OFFLINE", "1")
    with pytest.raises(weights.WeightsMissingError, match="downloads are off") as info:
        weights.ensure("tiny")
    assert "`sspsam weights fetch tiny`" in str(info.value) and "`sspsam weights import tiny /path/to/tiny.pt`" in str(info.value)
    assert server.requests == [] and cache_files(home) == []


def test_cli_offline_and_unreachable_are_one_line_with_the_commands(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from sspsam.cli.main import app as main_app
    from sspsam.data.shapes import make_scene

    img = tmp_path / "s.png"
    Image.fromarray(make_scene(0, width=64, height=48).render()).save(img)
    cases = [(["--offline"], {}, "downloads are off"),
             ([], {"SSPSAM_WEIGHTS_MIRROR": "http://127.0.0.1:9"}, "could not be downloaded")]  # port 9: refused
    for extra, env, reason in cases:
        for command in (["segment", str(img), "dog"], ["ovss", str(img), "-c", "a,b"]):
            r = runner.invoke(main_app, [*command, "--model", "zeroshot", *extra], env=env)
            assert r.exit_code == 2, r.output
            (line,) = r.stderr.splitlines()
            assert line.startswith("error: ") and reason in line
            for name in ("clip-vit-b16", "sam-vit-b"):
                assert f"`sspsam weights fetch {name}`" in line and f"`sspsam weights import {name} /path/to/" in line

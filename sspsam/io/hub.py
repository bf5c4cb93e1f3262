"""Models named on the Hugging Face Hub: ``hf-hub:OWNER/REPO[/PATH][@REVISION]``.

The same convention as open_clip's ``hf-hub:`` names, so a name works wherever a model name
does. Files go through ``huggingface_hub`` (its cache, its offline switch, its progress bars,
``HF_ENDPOINT``, ``HF_TOKEN``); what sspsam adds is what a user needs around it:

* a repository with several checkpoints (the authors' ``wayneicloud/SSP-SAM`` holds one per data
  set and size) is an error that lists them with their sizes, never a guess;
* ``--offline`` / ``SSPSAM_OFFLINE=1`` never touches the network and names the cache it looked in;
* an LFS file is checked against its sha256 (the Hub names the blob by it) once, after download;
  a file with the wrong bytes, or one cut short by an HTTP error, leaves nothing in the cache;
* every failure is one ``HubError`` line naming the repository and what to do.

``HF_ENDPOINT`` and the cache folders are read at call time (``huggingface_hub`` reads them once,
at import), so a process can point at a mirror or a test server after importing sspsam.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sspsam.io.weights import WeightsError, human_size

PREFIX = "hf-hub:"
#: files a repository listing offers as model checkpoints
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt")
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME = re.compile(rf"^(?P<owner>{_PART})/(?P<repo>{_PART})(?:/(?P<path>[^@]+?))?(?:@(?P<rev>[^@/\s][^@\s]*))?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class HubError(WeightsError):
    """A hub name, repository or download the user can fix."""


@dataclass(frozen=True)
class HubName:
    repo_id: str
    path: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return PREFIX + self.repo_id + (f"/{self.path}" if self.path else "") + (f"@{self.revision}" if self.revision else "")


def is_hub_name(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def parse(name: str) -> HubName:
    """``hf-hub:OWNER/REPO[/PATH][@REVISION]`` → its parts, or an error saying what the form is."""
    m = _NAME.match(name[len(PREFIX):]) if is_hub_name(name) else None
    path = m.group("path") if m else None
    if m is None or (path and any(p in ("", ".", "..") for p in path.split("/"))) or m.group("repo").endswith((".", "-")):
        raise HubError(f"malformed hub name {name!r}: expected hf-hub:OWNER/REPO, hf-hub:OWNER/REPO/PATH/IN/REPO.pth "
                       "or either with @REVISION (a branch, tag or commit)")
    return HubName(f"{m.group('owner')}/{m.group('repo')}", path, m.group("rev"))


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def cache_dir() -> Path:
    """huggingface_hub's cache folder, as its environment variables say now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    from sspsam.io.weights import offline as sspsam_offline

    return sspsam_offline() or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _repo_cache(hub: HubName) -> Path:
    return cache_dir() / ("models--" + hub.repo_id.replace("/", "--"))


def _explain(hub: HubName, exc: Exception) -> HubError:
    """huggingface_hub's many error types → one line that names the repository and the fix."""
    import huggingface_hub.errors as e

    where = f"{endpoint()}/{hub.repo_id}"
    if isinstance(exc, e.GatedRepoError):
        return HubError(f"{hub}: the repository is gated; accept its terms on {where} and log in (`hf auth login` or HF_TOKEN)")
    if isinstance(exc, e.RepositoryNotFoundError):
        return HubError(f"{hub}: no repository {hub.repo_id} on {endpoint()} (or it is private: log in with `hf auth login` or HF_TOKEN)")
    if isinstance(exc, e.RevisionNotFoundError):
        return HubError(f"{hub}: repository {hub.repo_id} has no revision {hub.revision!r}")
    if isinstance(exc, e.LocalEntryNotFoundError):
        return HubError(f"{hub}: not in the hub cache {cache_dir()} and downloads are off (--offline / SSPSAM_OFFLINE=1 / "
                        "HF_HUB_OFFLINE=1); run once with the network, or copy the cache folder over")
    if isinstance(exc, e.EntryNotFoundError):
        return HubError(f"{hub}: repository {hub.repo_id} has no file {hub.path!r}")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return HubError(f"{hub}: download from {where} failed ({f'HTTP {status}: ' if status else ''}{text}); "
                    "nothing was kept in the cache" if status else f"{hub}: cannot reach {where} ({text}); run again to retry")


def checkpoints(hub: HubName) -> list[tuple[str, int | None]]:
    """(path, size) of every checkpoint file in the repository, from the Hub or, offline, the cache."""
    if offline():
        snap = _cached_snapshot(hub)
        if snap is None:
            raise HubError(f"{hub}: not in the hub cache {cache_dir()} and downloads are off (--offline / SSPSAM_OFFLINE=1 / "
                           "HF_HUB_OFFLINE=1); run once with the network first")
        return sorted((p.relative_to(snap).as_posix(), p.stat().st_size) for p in snap.rglob("*")
                      if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        tree = list(HfApi(endpoint=endpoint()).list_repo_tree(hub.repo_id, recursive=True, revision=hub.revision))
    except Exception as exc:  # HTTP errors, connection errors, malformed answers
        raise _explain(hub, exc) from None
    return sorted((f.path, f.size) for f in tree if isinstance(f, RepoFile) and f.path.endswith(CHECKPOINT_SUFFIXES))


def _cached_snapshot(hub: HubName) -> Path | None:
    repo = _repo_cache(hub)
    ref = repo / "refs" / (hub.revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else hub.revision
    snap = repo / "snapshots" / commit if commit else None
    return snap if snap is not None and snap.is_dir() else None


def choose(hub: HubName) -> HubName:
    """The name with its checkpoint path: the one checkpoint of the repository, or an error listing them."""
    if hub.path:
        return hub
    files = checkpoints(hub)
    if not files:
        raise HubError(f"{hub}: repository {hub.repo_id} holds no checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})")
    if len(files) > 1:
        listed = "; ".join(f"{p} ({human_size(s)})" for p, s in files[:12]) + (f"; … {len(files) - 12} more" if len(files) > 12 else "")
        raise HubError(f"{hub}: repository {hub.repo_id} holds {len(files)} checkpoints, name one as "
                       f"{PREFIX}{hub.repo_id}/PATH: {listed}")
    return HubName(hub.repo_id, files[0][0], hub.revision)


def download(name: str | HubName, *, progress: bool = True) -> Path:
    """The local file of a hub checkpoint: downloaded once into huggingface_hub's cache, then reused;
    offline, only the cache is read."""
    from huggingface_hub import hf_hub_download

    hub = choose(parse(name) if isinstance(name, str) else name)
    try:
        local = Path(hf_hub_download(hub.repo_id, hub.path, revision=hub.revision, cache_dir=cache_dir(),
                                     endpoint=endpoint(), local_files_only=offline(), library_name="sspsam"))
    except Exception as exc:
        _drop_incomplete(hub, exc)
        raise _explain(hub, exc) from None
    _check_sha256(hub, local)
    return local


def _drop_incomplete(hub: HubName, exc: Exception) -> None:
    """A download the server answered with an error status will not resume into the right file:
    remove its partial blob (a cut connection keeps it, so the next try resumes)."""
    if getattr(getattr(exc, "response", None), "status_code", None) is None:
        return
    for part in (_repo_cache(hub) / "blobs").glob("*.incomplete"):
        part.unlink(missing_ok=True)


def _check_sha256(hub: HubName, local: Path) -> None:
    """The Hub stores an LFS file under its sha256: compare once, and remember a match beside the blob."""
    blob = local.resolve()
    if not _SHA256.match(blob.name):
        return  # a small git file, named by its git hash: nothing to compare cheaply
    stamp = blob.with_name(blob.name + ".sspsam-ok")
    if stamp.is_file():
        return
    with open(blob, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if digest != blob.name:
        blob.unlink(missing_ok=True)
        if local.is_symlink() or local.exists():
            local.unlink(missing_ok=True)
        raise HubError(f"{hub}: the downloaded file's sha256 is {digest[:16]}…, the Hub says {blob.name[:16]}…; "
                       "it was removed from the cache, run again to download it anew")
    stamp.touch()


def cached_models() -> list[dict]:
    """One row per checkpoint in the hub cache: name (``hf-hub:…``), size, path — for `sspsam weights list`."""
    rows = []
    root = cache_dir()
    for repo in sorted(root.glob("models--*--*")) if root.is_dir() else []:
        repo_id = repo.name[len("models--"):].replace("--", "/", 1)
        for snap in sorted((repo / "snapshots").glob("*")):
            for f in sorted(snap.rglob("*")):
                if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES:
                    rows.append({"name": f"{PREFIX}{repo_id}/{f.relative_to(snap).as_posix()}@{snap.name[:12]}",
                                 "size": f.stat().st_size, "path": str(f)})
    return rows


# ---- publishing sspsam checkpoints ----------------------------------------------------------

CHECKPOINT_NAME = "model.pt"
CARD_NAME = "README.md"


def _metrics_tables(folder: Path) -> list[str]:
    """Markdown rows from every ``metrics.json`` that `sspsam evaluate` wrote under a run folder."""
    import json

    rows = []
    for f in sorted(folder.rglob("metrics.json")) if folder.is_dir() else []:
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        metrics = d.get("metrics") if isinstance(d, dict) else None
        if not isinstance(metrics, dict):
            continue
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        cells = ", ".join(f"{k} {100 * v:.2f}" if isinstance(v, float) and 0 <= v <= 1 else f"{k} {v}" for k, v in flat.items())
        rows.append(f"| {d.get('dataset', '?')} | {d.get('split', '?')} | {d.get('protocol', '')} | {cells} |")
    return rows


def model_card(ckpt: dict, hub: HubName, folder: Path | None, sha256: str, commands: dict | None = None) -> str:
    """The repository's README: what the model is, how to run it, what it was trained and scored on.
    ``commands``: model type → the command that runs it ('segment' / 'ovss'); the caller reads it
    from the method registry (``sspsam.models.registry.commands_by_type``), default 'segment'."""
    import yaml

    cfg = ckpt.get("config", {})
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    kind = cfg.get("model", "?")
    command = (commands or {}).get(kind, "segment")
    example = '--classes "sky,road,car"' if command == "ovss" else '"the dog on the left"'
    lines = [
        "---", "library_name: sspsam", "pipeline_tag: image-segmentation",
        "tags: [sspsam, segment-anything, clip, " + ("open-vocabulary-semantic-segmentation" if command == "ovss" else "referring-expression-segmentation") + "]",
        "---", "", f"# {hub.repo_id.split('/')[1]}", "",
        f"An [sspsam](https://pypi.org/project/sspsam/) checkpoint: `{kind}` (config `{cfg.get('name', '?')}`).", "",
        "## Use", "", "```bash", f"sspsam {command} photo.jpg {example} -m {PREFIX}{hub.repo_id}", "```", "",
        "```python", "import sspsam",
        f"model = sspsam.{'OVSS' if command == 'ovss' else 'Segmenter'}.from_pretrained(\"{PREFIX}{hub.repo_id}\")", "```", "",
        "## Training", "",
    ]
    trained = {k: v for k, v in meta.items() if k in ("trained_on", "domain", "dataset", "steps", "batch", "seed", "train_minutes")}
    lines += [f"- {k}: {v}" for k, v in trained.items()] or ["- not recorded in the checkpoint"]
    if isinstance(meta.get("heldout"), dict):
        lines += [f"- held-out scores: {meta['heldout']}"]
    rows = _metrics_tables(folder) if folder is not None else []
    lines += ["", "## Metrics (`sspsam evaluate`)", ""]
    lines += (["| dataset | split | protocol | metrics (%) |", "|---|---|---|---|", *rows] if rows else ["None recorded beside the checkpoint."])
    external = ckpt.get("external_backbones") or []
    lines += ["", "## Files", "", f"- `{CHECKPOINT_NAME}`: sha256 `{sha256}`"]
    if external:
        lines += ["- backbones loaded from sspsam's weights cache on first use: "
                  + ", ".join(f"`{cfg[p].get('weights')}`" for p in external if isinstance(cfg.get(p), dict))]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def stage(source: str | os.PathLike, name: str, folder: str | os.PathLike,
          commands: dict | None = None) -> tuple[HubName, list[Path]]:
    """Write into ``folder`` what :func:`push` uploads: the checkpoint unchanged (``model.pt``) and
    its model card. ``source``: a run folder (its ``model.pt``) or a checkpoint file."""
    import shutil

    from sspsam.io.checkpoint import torch_load

    hub = parse(name)
    src = Path(source)
    run = src if src.is_dir() else None
    ckpt_path = src / CHECKPOINT_NAME if run is not None else src
    if not ckpt_path.is_file():
        raise HubError(f"nothing to push: {ckpt_path} not found (give a run folder with {CHECKPOINT_NAME} or a checkpoint file)")
    ckpt = torch_load(ckpt_path, "model checkpoint")
    if not isinstance(ckpt, dict) or "sspsam" not in ckpt or "config" not in ckpt:
        raise HubError(f"{ckpt_path} is not an sspsam checkpoint (what `sspsam train` writes); push uploads those")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt_path, out / CHECKPOINT_NAME)
    with open(out / CHECKPOINT_NAME, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    (out / CARD_NAME).write_text(model_card(ckpt, hub, run, digest, commands), encoding="utf-8")
    return hub, [out / CHECKPOINT_NAME, out / CARD_NAME]


def push(source: str | os.PathLike, name: str, *, private: bool = False, message: str | None = None,
         commands: dict | None = None) -> str:
    """Upload an sspsam checkpoint and its model card to ``hf-hub:OWNER/REPO[/PATH]``; returns the
    commit URL. Needs a token with write access (``hf auth login`` or HF_TOKEN)."""
    import tempfile

    from huggingface_hub import HfApi

    if offline():
        raise HubError("cannot push with downloads and uploads off (--offline / SSPSAM_OFFLINE=1 / HF_HUB_OFFLINE=1)")
    with tempfile.TemporaryDirectory(prefix="sspsam-push-") as tmp:
        hub, _files = stage(source, name, tmp, commands)
        api = HfApi(endpoint=endpoint())
        try:
            api.create_repo(hub.repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=hub.repo_id, folder_path=tmp, path_in_repo=hub.path or "",
                                     revision=hub.revision, commit_message=message or "Upload sspsam checkpoint")
        except Exception as exc:
            raise _explain(hub, exc) from None
    return str(getattr(info, "commit_url", info))

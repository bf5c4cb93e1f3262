"""Write tiny synthetic datasets in the exact distributed layouts (for tests and demos).

    sspsam tools generate-data refcoco   ROOT --n 20            # ROOT/refcoco/..., ROOT/images/mscoco/...
    sspsam tools generate-data refcocog  ROOT --n 20 --split-by umd
    sspsam tools generate-data grefcoco  ROOT --n 20            # ROOT/grefcoco/..., ROOT/images/train2014/
    sspsam tools generate-data phrasecut ROOT --n 20            # ROOT is the VGPhraseCut_v0 folder
    sspsam tools generate-data refcoco   ROOT --official        # + ROOT/data_seg/anns/refcoco.json etc. (SSP-SAM layout)

Images are scenes of coloured shapes (:mod:`sspsam.data.shapes`); every sentence is true of its
scene. Each image's colours are painted exactly on the masks its annotation decodes to (COCO's
rasteriser for refer/gRefCOCO, PhraseCut's for PhraseCut), so image and ground truth agree
pixel for pixel before JPEG compression. JPEG is the default, as in the real data; it is saved
at quality 95 without chroma subsampling, and ``image_ext="png"`` gives lossless images.
Everything is a pure function of ``seed``.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter
from collections.abc import Collection
from pathlib import Path

import numpy as np
from PIL import Image

from sspsam.data.shapes import (
    CATEGORIES,
    Expression,
    Scene,
    make_scene,
    multi_target_expressions,
    no_target_expressions,
    phrasecut_phrases,
    raw_form,
    single_target_expressions,
    tokenize,
)

SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco", "google"): ("train", "val", "test"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
    ("grefcoco", "unc"): ("train", "val", "testA", "testB"),
}
PHRASECUT_SPLITS = ("train", "val", "test", "miniv")


# ----------------------------------------------------------------------------------------------
# helpers


def _save_image(path: Path, image: np.ndarray, ext: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image)
    if ext in ("jpg", "jpeg"):
        img.save(path, format="JPEG", quality=95, subsampling=0)
    elif ext == "png":
        img.save(path, format="PNG")
    else:
        raise ValueError(f"image_ext must be jpg or png, got {ext!r}")


def _unique_ids(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    return [int(v) + lo for v in rng.choice(hi - lo, size=n, replace=False)]


def assign_splits(n: int, splits: tuple[str, ...], rng: np.random.Generator, train_share: float = 0.6) -> list[str]:
    """Split by image, as the unc/umd splits are: every split gets an image when n allows, the
    rest go to train with probability ``train_share`` and evenly to the others otherwise."""
    order = [int(i) for i in rng.permutation(n)]
    out = [""] * n
    for k, i in enumerate(order):
        if k < len(splits):
            out[i] = splits[k]
        elif len(splits) == 1 or rng.random() < train_share:
            out[i] = splits[0]
        else:
            out[i] = splits[1 + int(rng.integers(len(splits) - 1))]
    return out


def _coco_bbox(polygon: list[float]) -> list[float]:
    xs, ys = polygon[0::2], polygon[1::2]
    x0, y0 = min(xs), min(ys)
    return [round(x0, 2), round(y0, 2), round(max(xs) - x0, 2), round(max(ys) - y0, 2)]


def _sentences(texts: list[str], next_sent_id: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for k, text in enumerate(texts):
        out.append({"tokens": tokenize(text), "raw": raw_form(text, rng), "sent_id": next_sent_id + k, "sent": text})
    return out


def _pick(rng: np.random.Generator, items: list, k: int) -> list:
    if k >= len(items):
        return list(items)
    idx = sorted(int(i) for i in rng.choice(len(items), size=k, replace=False))
    return [items[i] for i in idx]


def _scene(seed: int, i: int, **kw) -> Scene:
    return make_scene(np.random.default_rng([int(seed), int(i)]), **kw)


def _keep(by_obj: dict[int, list[Expression]], templates: Collection[str] | None) -> dict[int, list[Expression]]:
    if templates is None:
        return by_obj
    return {k: [e for e in v if e.template in templates] for k, v in by_obj.items()}


def _coco_tables(scenes, image_ids, ann_ids, file_names):
    images, annotations = [], []
    for scene, iid, aids, fname in zip(scenes, image_ids, ann_ids, file_names):
        images.append(
            {
                "license": 1,
                "file_name": fname,
                "coco_url": "",
                "height": scene.height,
                "width": scene.width,
                "date_captured": "2013-11-14 16:28:13",
                "flickr_url": "",
                "id": iid,
            }
        )
        for obj, aid in zip(scene.objects, aids):
            annotations.append(
                {
                    "segmentation": [list(obj.polygon)],
                    "area": float(scene.mask(obj.index, "coco").sum()),
                    "iscrowd": 0,
                    "image_id": iid,
                    "bbox": _coco_bbox(obj.polygon),
                    "category_id": obj.category_id,
                    "id": aid,
                }
            )
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in CATEGORIES]}


def _summary(root: Path, files: list[Path], refs: list[dict], split_key: str = "split") -> dict:
    n_refs = Counter(r[split_key] for r in refs)
    n_sent = Counter()
    for r in refs:
        n_sent[r[split_key]] += len(r["sentences"]) if "sentences" in r else 1
    return {
        "root": str(root),
        "files": [str(f) for f in files],
        "refs": dict(n_refs),
        "sentences": dict(n_sent),
    }


# ----------------------------------------------------------------------------------------------
# RefCOCO family


def generate_refer(
    root: str | Path,
    dataset: str = "refcoco",
    split_by: str = "unc",
    n_images: int = 8,
    seed: int = 0,
    *,
    image_ext: str = "jpg",
    max_refs_per_image: int = 3,
    max_sentences: int = 3,
    scene_options: dict | None = None,
    templates: Collection[str] | None = None,
    train_share: float = 0.6,
) -> dict:
    """Write ``root/<dataset>/{instances.json, refs(<split_by>).p}`` and the images under
    ``root/images/mscoco/images/train2014/`` (lichengunc/refer layout).

    Every ref has one target annotation and 1..``max_sentences`` sentences that identify it
    uniquely. ``scene_options`` holds ``make_scene`` options (``n_objects``, ``palette``, ``background``,
    ``width``/``height``) and ``templates`` keeps only expressions of those templates (e.g.
    ``{"colour"}``): together they make easier, well-posed sets for end-to-end tests. Returns a
    summary: files written, ``refs`` and ``sentences`` per split, ``images`` per split.
    """
    if (dataset, split_by) not in SPLITS or dataset == "grefcoco":
        raise ValueError(
            f"unsupported dataset/split_by {dataset}/{split_by}; one of "
            + ", ".join(f"{d}/{s}" for d, s in SPLITS if d != "grefcoco")
        )
    root = Path(root)
    rng = np.random.default_rng([int(seed), 1])
    splits = SPLITS[(dataset, split_by)]
    image_splits = assign_splits(n_images, splits, rng, train_share)
    image_ids = sorted(_unique_ids(rng, n_images, 1, 581_930))
    image_dir = root / "images" / "mscoco" / "images" / "train2014"

    scenes, ann_ids, file_names, refs = [], [], [], []
    next_ann, next_ref, next_sent = 1000 + int(rng.integers(1000)), 0, 0
    for i in range(n_images):
        attempt = 0
        while True:  # a scene where at least one object can be named uniquely
            scene = _scene(seed, i + 1_000_003 * attempt, **(scene_options or {}))
            by_obj = {k: v for k, v in _keep(single_target_expressions(scene), templates).items() if v}
            if by_obj:
                break
            attempt += 1
        scenes.append(scene)
        aids = list(range(next_ann, next_ann + len(scene.objects)))
        next_ann += len(scene.objects) + int(rng.integers(1, 50))
        ann_ids.append(aids)
        iid = image_ids[i]
        fname = f"COCO_train2014_{iid:012d}.{image_ext}"
        file_names.append(fname)
        _save_image(image_dir / fname, scene.render("coco"), image_ext)

        targets = _pick(rng, sorted(by_obj), int(rng.integers(1, max_refs_per_image + 1)))
        for t in targets:
            exprs = by_obj[t]
            k = int(rng.integers(1, min(max_sentences, len(exprs)) + 1))
            texts = [e.text for e in _pick(rng, exprs, k)]
            sentences = _sentences(texts, next_sent, rng)
            next_sent += len(sentences)
            refs.append(
                {
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "file_name": f"COCO_train2014_{iid:012d}_{aids[t]}.{image_ext}",
                    "ann_id": aids[t],
                    "ref_id": next_ref,
                    "image_id": iid,
                    "split": image_splits[i],
                    "sentences": sentences,
                    "category_id": scene.objects[t].category_id,
                }
            )
            next_ref += 1

    data_dir = root / dataset
    data_dir.mkdir(parents=True, exist_ok=True)
    inst_path = data_dir / "instances.json"
    inst_path.write_text(json.dumps(_coco_tables(scenes, image_ids, ann_ids, file_names)))
    refs_path = data_dir / f"refs({split_by}).p"
    with open(refs_path, "wb") as f:
        pickle.dump(refs, f, protocol=2)  # the released files are Python 2 pickles
    out = _summary(root, [inst_path, refs_path, image_dir], refs)
    out["images"] = dict(Counter(image_splits))
    out["image_dir"] = str(image_dir)
    return out


# ----------------------------------------------------------------------------------------------
# gRefCOCO


def generate_grefcoco(
    root: str | Path,
    n_images: int = 8,
    seed: int = 0,
    *,
    split_by: str = "unc",
    image_ext: str = "jpg",
    max_sentences: int = 2,
    scene_options: dict | None = None,
    templates: Collection[str] | None = None,
    multi_target: bool = True,
    train_share: float = 0.6,
    no_target_share: float = 1.0,
    splits: tuple[str, ...] | None = None,
) -> dict:
    """Write ``root/grefcoco/{grefs(unc).json, instances.json}`` and the images under
    ``root/images/train2014/`` (ReLA layout).

    Per image: one or two single-target refs, up to two multi-target refs and one no-target ref
    (``ann_id == [-1]``, ``category_id == [-1]``, ``no_target: true``). Returns a summary with
    ``refs``/``sentences`` per split and ``kinds`` (single/multi/none sentence counts).
    ``scene_options``/``templates`` as in :func:`generate_refer` (``templates`` filters the no-target
    expressions too); ``multi_target=False`` leaves out the multi-target refs;
    ``no_target_share`` is the chance that an image gets its no-target ref; ``splits`` replaces
    gRefCOCO's train/val/testA/testB (the first one is the training split).
    """
    root = Path(root)
    rng = np.random.default_rng([int(seed), 2])
    if splits is None:
        splits = SPLITS[("grefcoco", split_by)] if ("grefcoco", split_by) in SPLITS else ("train", "val")
    image_splits = assign_splits(n_images, tuple(splits), rng, train_share)
    image_ids = sorted(_unique_ids(rng, n_images, 1, 581_930))
    image_dir = root / "images" / "train2014"

    scenes, ann_ids, file_names, refs = [], [], [], []
    kinds: Counter = Counter()
    next_ann, next_ref, next_sent = 2000 + int(rng.integers(1000)), 0, 0
    for i in range(n_images):
        attempt = 0
        while True:
            scene = _scene(seed, 7 * i + 3 + 1_000_003 * attempt, **(scene_options or {}))
            singles = {k: v for k, v in _keep(single_target_expressions(scene), templates).items() if v}
            multis = multi_target_expressions(scene) if multi_target else []
            palette = (scene_options or {}).get("palette")
            nones = [e for e in no_target_expressions(scene, palette) if templates is None or e.template in templates]
            if singles and nones:
                break
            attempt += 1
        scenes.append(scene)
        aids = list(range(next_ann, next_ann + len(scene.objects)))
        next_ann += len(scene.objects) + int(rng.integers(1, 50))
        ann_ids.append(aids)
        iid = image_ids[i]
        fname = f"COCO_train2014_{iid:012d}.{image_ext}"
        file_names.append(fname)
        _save_image(image_dir / fname, scene.render("coco"), image_ext)

        groups: list[list[Expression]] = []
        for t in _pick(rng, sorted(singles), int(rng.integers(1, 3))):
            groups.append(singles[t])
        by_targets: dict[tuple, list[Expression]] = {}
        for e in multis:
            by_targets.setdefault(e.targets, []).append(e)
        for key in _pick(rng, sorted(by_targets), int(rng.integers(0, 3))):
            groups.append(by_targets[key])
        if no_target_share >= 1.0 or rng.random() < no_target_share:
            groups.append(nones)
        for exprs in groups:
            k = int(rng.integers(1, min(max_sentences, len(exprs)) + 1))
            chosen = _pick(rng, exprs, k)
            sentences = _sentences([e.text for e in chosen], next_sent, rng)
            next_sent += len(sentences)
            e0 = chosen[0]
            no_target = e0.no_target
            kinds[e0.kind] += len(sentences)
            refs.append(
                {
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "file_name": fname,
                    "ann_id": [-1] if no_target else [aids[t] for t in e0.targets],
                    "ref_id": next_ref,
                    "image_id": iid,
                    "split": image_splits[i],
                    "sentences": sentences,
                    "category_id": [-1] if no_target else [scene.objects[t].category_id for t in e0.targets],
                    "no_target": no_target,
                }
            )
            next_ref += 1

    data_dir = root / "grefcoco"
    data_dir.mkdir(parents=True, exist_ok=True)
    inst_path = data_dir / "instances.json"
    inst_path.write_text(json.dumps(_coco_tables(scenes, image_ids, ann_ids, file_names)))
    refs_path = data_dir / f"grefs({split_by}).json"
    refs_path.write_text(json.dumps(refs))
    out = _summary(root, [inst_path, refs_path, image_dir], refs)
    out["images"] = dict(Counter(image_splits))
    out["image_dir"] = str(image_dir)
    out["kinds"] = dict(kinds)
    return out


# ----------------------------------------------------------------------------------------------
# PhraseCut


def _inclusive_box(mask: np.ndarray) -> list[int]:
    """PhraseCut's xywh: x, y of the first pixel, w/h counting both end pixels."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def generate_phrasecut(
    root: str | Path,
    n_images: int = 8,
    seed: int = 0,
    *,
    splits: tuple[str, ...] = PHRASECUT_SPLITS,
    image_ext: str = "jpg",
    max_tasks_per_image: int = 4,
) -> dict:
    """Write a VGPhraseCut_v0 folder at ``root``: ``image_data_split.json``,
    ``refer_<split>.json`` + ``refer_input_<split>.json`` for each split, ``images/<id>.jpg``.

    A phrase refers to every instance matching it (PhraseCut's semantics); polygons have integer
    vertices. Returns a summary with ``refs`` (= tasks) and ``sentences`` per split.
    """
    root = Path(root)
    rng = np.random.default_rng([int(seed), 3])
    image_splits = assign_splits(n_images, tuple(splits), rng)
    image_ids = sorted(_unique_ids(rng, n_images, 1, 2_417_998))
    image_dir = root / "images"
    infos, tasks_by_split = [], {s: [] for s in splits}
    next_obj = 1_000_000 + int(rng.integers(100_000))
    for i in range(n_images):
        scene = _scene(seed, 11 * i + 5, integer_vertices=True)
        iid = image_ids[i]
        _save_image(image_dir / f"{iid}.{image_ext}", scene.render("phrasecut"), image_ext)
        infos.append(
            {
                "image_id": iid,
                "coco_id": None,
                "flickr_id": None,
                "width": scene.width,
                "height": scene.height,
                "url": "",
                "split": image_splits[i],
            }
        )
        obj_ids = list(range(next_obj, next_obj + len(scene.objects)))
        next_obj += len(scene.objects) + int(rng.integers(1, 500))
        seen, unique_phrases = set(), []
        for phrase, targets, structure in phrasecut_phrases(scene):
            if targets not in seen:  # one task per region, so task_ids stay unique
                seen.add(targets)
                unique_phrases.append((phrase, targets, structure))
        for phrase, targets, structure in _pick(rng, unique_phrases, int(rng.integers(1, max_tasks_per_image + 1))):
            ids = [obj_ids[t] for t in targets]
            tasks_by_split[image_splits[i]].append(
                {
                    "task_id": f"{iid}__{'_'.join(map(str, ids))}",
                    "image_id": iid,
                    "ann_ids": ids,
                    "instance_boxes": [_inclusive_box(scene.mask(t, "phrasecut")) for t in targets],
                    "Polygons": [[[list(map(int, p)) for p in scene.objects[t].points]] for t in targets],
                    "phrase": phrase,
                    "phrase_structure": structure,
                }
            )
    root.mkdir(parents=True, exist_ok=True)
    files = [root / "image_data_split.json", image_dir]
    (root / "image_data_split.json").write_text(json.dumps(infos))
    all_tasks = []
    for s, tasks in tasks_by_split.items():
        (root / f"refer_{s}.json").write_text(json.dumps(tasks))
        inputs = [
            {
                "task_id": t["task_id"],
                "image_id": t["image_id"],
                "phrase": t["phrase"],
                "phrase_structure": {
                    k: t["phrase_structure"][k] for k in ("name", "attributes", "relation_descriptions")
                },
            }
            for t in tasks
        ]
        (root / f"refer_input_{s}.json").write_text(json.dumps(inputs))
        files += [root / f"refer_{s}.json", root / f"refer_input_{s}.json"]
        all_tasks += [{**t, "split": s} for t in tasks]
    out = _summary(root, files, all_tasks)
    out["images"] = dict(Counter(image_splits))
    out["image_dir"] = str(image_dir)
    return out


KINDS = ("refcoco", "refcoco+", "refcocog", "grefcoco", "phrasecut")


def generate(kind: str, root: Path | str, n: int = 20, seed: int = 0, split_by: str | None = None,
             image_ext: str = "jpg", official: bool = False) -> dict:
    """Write the data set ``kind`` (one of :data:`KINDS`) under ``root`` and return its summary
    (what `sspsam tools generate-data` prints). ``official`` also writes the SSP-SAM layout
    (``ROOT/data_seg/anns``, ``ROOT/data_seg/masks``, ``ROOT/data/``) of the same data.
    Raises ValueError for a request that cannot be written."""
    root = Path(root)
    if kind not in KINDS:
        raise ValueError(f"unknown data set {kind!r}; one of {', '.join(KINDS)}")
    if n < 1:
        raise ValueError("--n must be at least 1")
    if image_ext not in ("jpg", "png"):
        raise ValueError(f"image format {image_ext!r}: jpg or png")
    if official and kind == "phrasecut":
        raise ValueError("--official: the SSP-SAM layout is written for the RefCOCO family and gRefCOCO")
    if kind in ("refcoco", "refcoco+", "refcocog"):
        summary = generate_refer(root, kind, split_by or ("umd" if kind == "refcocog" else "unc"), n, seed,
                                 image_ext=image_ext)
    elif kind == "grefcoco":
        summary = generate_grefcoco(root, n, seed, split_by=split_by or "unc", image_ext=image_ext)
    else:
        summary = generate_phrasecut(root, n, seed, image_ext=image_ext)
    if official:
        from sspsam.data.official_anns import write_official_anns

        summary["official"] = write_official_anns(root, root, kind, split_by)
    return summary

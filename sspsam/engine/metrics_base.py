"""What every meter of :mod:`sspsam.engine.metrics` shares: the mask helpers, the streaming
:class:`Meter` (sums only, so distributed evaluation is one all-reduce) and the markdown row."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

#: LAVT ``eval_seg_iou_list`` and PhraseCut ``mask_threshs``.
RES_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
#: ReLA ``pr_thres``.
GRES_THRESHOLDS: tuple[float, ...] = (0.7, 0.8, 0.9)

NAN = float("nan")


# --------------------------------------------------------------------------- helpers


def as_numpy(x: Any) -> np.ndarray:
    """numpy array from a numpy array, a (possibly CUDA) torch tensor or a nested list."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_binary(x: Any, name: str) -> np.ndarray:
    """A mask as a bool array. Nonzero is foreground (as ``np.logical_and`` treats it in the
    references); float input is refused, since a probability map must be thresholded first."""
    a = as_numpy(x)
    if a.dtype == np.bool_:
        return a
    if np.issubdtype(a.dtype, np.integer):
        return a != 0
    raise TypeError(f"{name} must be a bool or integer mask (threshold probabilities first), got dtype {a.dtype}")


def check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: prediction shape {a.shape} != ground-truth shape {b.shape}")


def inter_union(pred: np.ndarray, gt: np.ndarray, ignore: Any = None) -> tuple[int, int]:
    if ignore is not None:
        keep = ~as_binary(ignore, "ignore")
        check_same_shape(keep, gt, "ignore mask")
        pred = pred & keep
        gt = gt & keep
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def safe_div(a: float, b: float) -> float:
    return float(a) / float(b) if b else NAN


def threshold_name(t: float) -> str:
    return f"Pr@{t:.1f}" if round(t, 1) == t else f"Pr@{t:g}"


def check_merge(a: "Meter", b: "Meter") -> None:
    if type(a) is not type(b):
        raise TypeError(f"cannot merge {type(b).__name__} into {type(a).__name__}")
    if a._config() != b._config():
        raise ValueError(f"cannot merge meters with different settings: {a._config()} vs {b._config()}")


class Meter:
    """Shared plumbing: state is a dict of sums (ints, floats, int64 arrays)."""

    _state: dict[str, Any]

    def _config(self) -> tuple:  # pragma: no cover - overridden
        return ()

    def _empty_state(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def reset(self) -> None:
        self._state = self._empty_state()

    def state_dict(self) -> dict[str, Any]:
        """Copies of the accumulated sums; every value may be all-reduced with SUM."""
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self._state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        empty = self._empty_state()
        if set(state) != set(empty):
            raise KeyError(f"state keys {sorted(state)} != expected {sorted(empty)}")
        new: dict[str, Any] = {}
        for k, ref in empty.items():
            v = state[k]
            if isinstance(ref, np.ndarray):
                arr = as_numpy(v)
                if arr.shape != ref.shape:
                    raise ValueError(f"state[{k!r}] has shape {arr.shape}, expected {ref.shape}")
                new[k] = np.rint(arr).astype(np.int64) if arr.dtype.kind == "f" else arr.astype(np.int64)
            else:
                v = as_numpy(v).item() if not isinstance(v, (int, float)) else v
                new[k] = int(round(v)) if isinstance(ref, int) else float(v)
        self._state = new

    def merge(self, other: "Meter") -> "Meter":
        """Add ``other``'s sums into this meter (in place); returns self."""
        check_merge(self, other)
        for k, v in other._state.items():
            self._state[k] = self._state[k] + v
        return self

    def __len__(self) -> int:
        return int(self._state["n"])


# --------------------------------------------------------------------------- reporting


def format_table(results: Mapping[str, Any], keys: Iterable[str], header: bool = False, label: str | None = None) -> str:
    """A markdown table row of ``results[k]`` for ``k`` in ``keys``, papers' style.

    Fractions become percentages to two decimals (0.72731 → ``72.73``); ints (counts such as
    ``n``) print as they are; nan prints ``n/a``. ``label`` adds a first cell (e.g. the split).
    ``header=True`` prepends the header and separator lines.
    """
    keys = list(keys)
    cells = []
    for k in keys:
        v = results[k]
        if isinstance(v, (bool, np.bool_)):
            cells.append(str(bool(v)))
        elif isinstance(v, (int, np.integer)):
            cells.append(str(int(v)))
        else:
            f = float(v)
            cells.append("n/a" if math.isnan(f) else f"{100.0 * f:.2f}")
    names = keys
    if label is not None:
        cells.insert(0, label)
        names = [""] + keys
    row = "| " + " | ".join(cells) + " |"
    if not header:
        return row
    head = "| " + " | ".join(names) + " |"
    sep = "|" + "|".join("---" for _ in names) + "|"
    return "\n".join([head, sep, row])

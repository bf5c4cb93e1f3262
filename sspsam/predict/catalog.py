"""Every model name the commands accept, for `sspsam models`: which command takes it and
whether the files it needs are already on this machine (no hashing, no network)."""

from __future__ import annotations

#: the SSP-SAM authors' Hugging Face repository (their trained checkpoints and processed annotations)
OFFICIAL_HUB = "hf-hub:wayneicloud/SSP-SAM"


def _weights_state(names: list[str]) -> str:
    import sspsam.io.weights as weights

    if not names:
        return "no weights needed"
    parts = []
    for n in names:
        try:
            parts.append(f"{n} {'cached' if weights.find(n) is not None else 'not cached'}")
        except weights.UnknownWeightsError:
            parts.append(f"{n} (unregistered)")
    return ", ".join(parts)


def catalog() -> list[dict]:
    """Rows of name, kind (bundled/zeroshot/variant/test), commands (segment/ovss) and weights state."""
    from sspsam.config import list_configs, load_config
    from sspsam.models import registry
    from sspsam.predict.ovss import BUNDLED as OVSS_BUNDLED
    from sspsam.predict.segmenter import BUNDLED

    rows = [{"name": n, "kind": "bundled", "commands": ("segment",), "weights": "in the package (demo: generated shapes only)"}
            for n in BUNDLED]
    rows += [{"name": n, "kind": "bundled", "commands": ("ovss",), "weights": "in the package (demo: generated shapes only)"}
             for n in OVSS_BUNDLED]
    for name in list_configs():
        cfg = load_config(name)
        method = registry.for_config(cfg)
        needs = [cfg[part]["weights"] for part in ("clip", "sam") if isinstance(cfg.get(part), dict) and cfg[part].get("weights")]
        commands = method.commands
        if method.training_free:
            label = method.name
            state = _weights_state(needs)
        else:
            label = "variant"
            state = "trained checkpoint by path" + (f"; backbones: {_weights_state(needs)}" if needs else "")
        if name.endswith("-tiny"):
            label, state = "test", "random weights (tests only)"
        rows.append({"name": name, "kind": label, "commands": commands, "weights": state})
    rows += [{"name": f"{OFFICIAL_HUB}/<path>", "kind": "hub", "commands": ("segment",),
              "weights": f"the authors' released SSP-SAM checkpoints; -m {OFFICIAL_HUB} lists them"}]
    return rows


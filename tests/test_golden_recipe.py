"""The golden fixtures' weights regenerate bit for bit from their manifests (SHA-256 per tensor)."""

import numpy as np
import pytest

import sspsam.tools.golden as golden


@pytest.mark.parametrize("name", ["sclip", "clip_surgery", "mobile_sam_tinyvit"])
def test_regenerated_weights_are_bitwise_the_recipe(name):
    sd = golden.generate(name)
    assert len(sd) == 302
    assert golden.verify(name, sd) == []


def test_verify_catches_a_changed_value_and_a_missing_key():
    sd = golden.generate("mobile_sam_tinyvit", as_torch=False)
    key = next(iter(sd))
    sd[key] = sd[key].copy()
    sd[key].flat[0] = np.nextafter(sd[key].flat[0], np.float32(np.inf))
    removed = list(sd)[-1]
    del sd[removed]
    assert golden.verify("mobile_sam_tinyvit", sd) == [(key, "values differ"), (removed, "missing")]


def test_random_inputs_regenerate():
    x = golden.generate("mobile_sam_tinyvit", section="inputs")["image"]
    assert tuple(x.shape) == (1, 3, 1024, 1024)
    assert golden.verify("mobile_sam_tinyvit", {"image": x}, section="inputs") == []

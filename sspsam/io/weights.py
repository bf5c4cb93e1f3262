"""The weights channel: a registry of named checkpoint files and a local, verified cache (how files
get there and how they are checked: :mod:`sspsam.io.weights_registry`).

The registry and the cache's bookkeeping are in :mod:`sspsam.io.weights_registry`, downloads and
imports in :mod:`sspsam.io.download`; this module gathers them (the import path every caller uses).
"""

from __future__ import annotations

from sspsam.io.download import (  # noqa: F401 (re-exported)
    ensure,
    ensure_all,
    fetch,
    import_file,
)
from sspsam.io.weights_registry import (  # noqa: F401 (re-exported)
    ChecksumError,
    DownloadError,
    KINDS,
    Kind,
    REGISTRY,
    UnknownWeightsError,
    WeightSpec,
    WeightsError,
    WeightsMissingError,
    expected_sha256,
    file_hasher,
    find,
    fsync_dir,
    get_spec,
    human_size,
    list_weights,
    local_path,
    offline,
    part_path,
    recorded_sha256,
    register,
    require,
    sha256_file,
    sidecar_path,
    source_url,
    spec_sha256,
    status,
    verify,
    weights_home,
    write_sidecar,
)

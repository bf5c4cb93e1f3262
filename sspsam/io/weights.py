"""The weights channel: a registry of named checkpoint files and a local, verified cache.

Files live at ``<SSPSAM_HOME>/weights/<filename>`` (default ``~/.cache/sspsam``). They get there
only through ``fetch`` (resumable HTTP download) or ``import_file`` (an offline copy), and both
check the file before an atomic rename, so a file in the cache is never half-written.

Missing weights are fetched on first use (``ensure``: what ``from_pretrained`` and the CLI call)
unless ``SSPSAM_OFFLINE=1`` (or ``--offline``); ``SSPSAM_WEIGHTS_MIRROR=URL`` downloads every file
as ``URL/<filename>`` instead of from the registry's address (a mirror, or a test server).

Beside each file sits ``<filename>.sha256`` in ``sha256sum`` format: the digest the file had when
it entered the cache. For a spec with a published digest it is a cheap "checked" stamp for
``list_weights``; for a spec without one it is the only reference later checks can use
(trust on first download), and the user is warned.

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

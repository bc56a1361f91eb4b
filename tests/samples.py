"""Where Istio's sample configurations are: read in place, never copied into the repository.

Looked for in ``$MESHLET_ISTIO_SAMPLES``, then beside the checkout (``<repo>/../shared``), then
in ``/work/shared`` (this workplace's shared folder, for clones made elsewhere). ``SAMPLES`` is
None when none exists; tests that need the samples skip then.
"""

from __future__ import annotations

import os
from pathlib import Path


def _find() -> Path | None:
    candidates = [
        os.environ.get("MESHLET_ISTIO_SAMPLES"),
        Path(__file__).resolve().parents[2] / "shared" / "istio-samples",
        "/work/shared/istio-samples",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "bookinfo").is_dir():
            return Path(candidate)
    return None


SAMPLES = _find()

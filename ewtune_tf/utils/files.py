"""Atomic JSON files: a reader sees the old content or the new, never half of it."""

import json
import os
import tempfile
from typing import Any


def json_default(x: Any) -> Any:
    """``json.dump`` fallback: numpy scalars and arrays as Python values, else ``str``."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def atomic_write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` via a temp file in the same
    directory, fsync and ``os.replace`` (atomic on one file system), so a kill
    at any moment leaves either the previous file or the complete new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)

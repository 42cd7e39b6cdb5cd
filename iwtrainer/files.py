"""Writing the package's JSON records: atomically (a temporary file renamed over the target), so a crash or a
reader never sees half a file."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str | os.PathLike[str], data: Any, indent: int = 2) -> str:
    """Write ``data`` as JSON to ``path`` (parent folders created) through ``<path>.tmp-<pid>`` and ``os.replace``."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=indent, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # the target is untouched; leave no half-written temporary beside it
            os.remove(tmp)
        raise
    return path

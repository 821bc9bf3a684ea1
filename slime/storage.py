"""Read-only access to model files by local path or URI (s3://, gs://, ...) through fsspec.

The model package only ever *reads* remote checkpoints (copied once into a local cache); writing to
object storage is the pipelines' job.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def local_copy(path: str, cache_dir: str | None = None) -> str:
    """Local directory for ``path``: itself when local, else a cached copy of the remote directory."""
    if not is_remote(path):
        return path.removeprefix("file://")
    import fsspec

    cache_root = Path(cache_dir or os.environ.get("SLIME_CACHE", Path.home() / ".cache" / "slime"))
    dest = cache_root / hashlib.sha256(path.encode()).hexdigest()[:16]
    marker = dest / ".complete"
    if marker.exists():
        return str(dest)
    fs, root = fsspec.core.url_to_fs(path)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    fs.get(root.rstrip("/") + "/", str(tmp), recursive=True)
    if dest.exists():  # a copy that died half-way: never trust it
        shutil.rmtree(dest)
    tmp.rename(dest)
    marker.touch()
    return str(dest)

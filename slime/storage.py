"""Read-only access to model files by local path or URI (s3://, gs://, ...) through fsspec.

The model package only ever *reads* remote directories; writing to object storage is the pipelines' job.
``local_copy`` is the one cache of remote directories for every stage (model loading, the vLLM view,
preprocessing actors, ``slime convert``):

    <SLIME_CACHE or ~/.cache/slime>/models/<sha256(uri)[:16]>/<content key>/   finished copies, never changed
                                                           /.<content key>.lock  one download per content
                                                           /.<content key>.*     a download in progress

The content key hashes the remote listing: every file's relative path, size and the store's own checksum
(S3 ETag, GCS md5/crc32c; the modification time only where a store has none). A re-export to the same URI
has a new key, so it lands in a new directory next to the old one instead of over it: a process still
reading the old copy keeps a complete one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any

_CHECKSUM_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "sha256", "checksum")  # S3, GCS, Azure, ...
_TIME_FIELDS = ("mtime", "LastModified", "last_modified", "updated", "created")
_TRIES = 3


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def cache_root() -> Path:
    return Path(os.environ.get("SLIME_CACHE") or Path.home() / ".cache" / "slime")


def _version(info: dict[str, Any]) -> str:
    """What changes when a file's content does: the store's checksum, else its modification time (sizes
    alone do not: a retrained model has the same tensor shapes, so the same file sizes)."""
    for fields in (_CHECKSUM_FIELDS, _TIME_FIELDS):
        for name in fields:
            if info.get(name) is not None:
                return f"{name}={info[name]}"
    raise ValueError(f"{info.get('name')}: the store reports neither a checksum nor a modification time, "
                     "so a changed file cannot be told from a cached one")


def _listing(fs, root: str) -> dict[str, tuple[int, str]]:
    """{relative POSIX path: (size, version)} of every file under ``root``, sorted; one listing call."""
    fs.invalidate_cache(root)  # fsspec instances are shared per process: a listing cached before a re-export is stale
    out = {}
    for p, info in fs.find(root, detail=True).items():
        rel = posixpath.relpath(str(p), root)
        if rel != "." and not rel.startswith(".."):
            out[rel] = (int(info["size"]), _version(info))
    return dict(sorted(out.items()))


def content_key(listing: dict[str, tuple[int, str]]) -> str:
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:20]


def local_copy(path: str, cache_dir: str | None = None, *, fs=None) -> str:
    """Local directory holding the files under ``path``: ``path`` itself when local, else the cached copy
    of what is there now (see the module docstring). ``fs`` is an fsspec filesystem to read with (the
    pipelines pass one built from their StorageConfig); by default fsspec builds one from the URI and the
    environment. ``cache_dir`` replaces ``<cache root>/models``.

    Safe for concurrent callers: a finished copy is never modified or deleted; fetchers of the same content
    on one machine take turns on a lock file (the second finds the first's copy); each download goes to its
    own temporary directory renamed into place, and a rename that loses to another host's (shared cache
    without working locks) keeps the winner's identical copy."""
    if not is_remote(path):
        return path.removeprefix("file://")
    if fs is None:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
    else:
        root = fs._strip_protocol(path)
    root = root.rstrip("/")
    home = Path(cache_dir or cache_root() / "models") / hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:16]
    for _ in range(_TRIES):
        listing = _listing(fs, root)
        if not listing:
            raise FileNotFoundError(f"{path}: no files there")
        key = content_key(listing)
        dest = home / key
        if dest.is_dir():
            return str(dest)
        home.mkdir(parents=True, exist_ok=True)
        with open(home / f".{key}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if dest.is_dir():
                return str(dest)
            if _download(fs, root, listing, home, dest):
                return str(dest)
    raise RuntimeError(f"{path} changed while it was copied, {_TRIES} times: is an export still writing it?")


def _download(fs, root: str, listing: dict[str, tuple[int, str]], home: Path, dest: Path) -> bool:
    """Copy ``listing`` into a fresh temp dir and rename it to ``dest``; False if the remote changed meanwhile."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=home))
    try:
        for rel, (size, _) in listing.items():
            target = tmp.joinpath(*rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(posixpath.join(root, rel), str(target))
            if target.stat().st_size != size:
                return False
        # Listed, copied, listed again: an export that replaced files in between is not cached as a mix.
        if _listing(fs, root) != listing:
            return False
        tmp.chmod(0o755)  # mkdtemp makes it private; a finished copy is shared
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only ever our own temp dir (gone after a successful rename)

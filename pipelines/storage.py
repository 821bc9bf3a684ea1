"""One storage API for local paths and ``s3://`` URIs (fsspec: LocalFileSystem / s3fs).

Every pipeline reads and writes through these helpers, so a dataset, checkpoint or report directory
can live on local disk, NFS or any S3-compatible store (AWS, MinIO, moto in tests) without branches
in the calling code. Credentials and the endpoint come from the standard AWS environment variables
unless a ``StorageConfig`` says otherwise.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """S3 connection settings; every field defaults to the AWS env var read when the config is built."""

    endpoint_url: str | None = field(default_factory=lambda: _env("AWS_ENDPOINT_URL"))
    region: str | None = field(default_factory=lambda: _env("AWS_DEFAULT_REGION") or _env("AWS_REGION"))
    access_key: str | None = field(default_factory=lambda: _env("AWS_ACCESS_KEY_ID"), repr=False)
    secret_key: str | None = field(default_factory=lambda: _env("AWS_SECRET_ACCESS_KEY"), repr=False)
    session_token: str | None = field(default_factory=lambda: _env("AWS_SESSION_TOKEN"), repr=False)
    anon: bool = False


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a local path or an s3:// URI (always "/" for S3)."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def filesystem(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for ``uri``. S3 paths come back as ``bucket/key`` (no scheme)."""
    if not is_s3(uri):
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    import s3fs  # imported lazily: local-only jobs never pay for botocore

    cfg = storage_cfg or StorageConfig()
    client_kwargs = {k: v for k, v in (("endpoint_url", cfg.endpoint_url), ("region_name", cfg.region)) if v}
    # Listings cache off: another process (a Ray worker, a second pack run) may have written since.
    fs = s3fs.S3FileSystem(anon=cfg.anon, key=cfg.access_key, secret=cfg.secret_key, token=cfg.session_token,
                           client_kwargs=client_kwargs, use_listings_cache=False)
    return fs, uri.split("://", 1)[1].rstrip("/")


def read_bytes(uri: str, storage_cfg: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, storage_cfg)
    return fs.cat_file(path)


def write_bytes_atomic(uri: str, data: bytes, storage_cfg: StorageConfig | None = None) -> None:
    """Readers never see a partial file: local = temp file in the same dir + os.replace; an S3 PUT
    is already all-or-nothing per object."""
    fs, path = filesystem(uri, storage_cfg)
    if is_s3(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; published files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def upload_file(local_path: str, uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Publish a finished local file at ``uri`` atomically (same guarantee as write_bytes_atomic)."""
    fs, path = filesystem(uri, storage_cfg)
    if is_s3(uri):
        fs.put_file(local_path, path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    shutil.copyfile(local_path, tmp)
    os.replace(tmp, path)


def exists(uri: str, storage_cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, storage_cfg)
    return fs.exists(path)


def listdir(uri: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """Sorted entry names (not full paths) directly under ``uri``; [] if it does not exist (S3 has no
    empty directories, so "missing" and "empty" are the same thing there)."""
    fs, path = filesystem(uri, storage_cfg)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = {posixpath.basename(str(e).rstrip("/")) for e in entries}
    names.discard(posixpath.basename(path))  # s3fs lists a key equal to the prefix itself
    return sorted(n for n in names if n)


def _files_under(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int]:
    """{relative POSIX path: size} of every file under ``root``, sorted (one listing call on S3)."""
    out = {}
    for p, info in fs.find(root, detail=True).items():
        rel = posixpath.relpath(str(p).replace(os.sep, "/"), root.replace(os.sep, "/"))
        if rel != "." and not rel.startswith(".."):
            out[rel] = info["size"]
    return dict(sorted(out.items()))


def copy_dir(src: str, dst: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """Copy every file under ``src`` to the same relative path under ``dst`` (local or S3 on either
    side). Returns the relative paths copied. Each file lands atomically."""
    src_fs, src_path = filesystem(src, storage_cfg)
    rels = list(_files_under(src_fs, src_path))
    if not rels and not src_fs.exists(src_path):
        raise FileNotFoundError(f"copy_dir: source {src} does not exist")
    for rel in rels:
        s, d = posixpath.join(src_path, rel), join(dst, *rel.split("/"))
        if not is_s3(src):
            upload_file(s, d, storage_cfg)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "blob")
                src_fs.get_file(s, local)
                upload_file(local, d, storage_cfg)
    return rels

"""Paths are URLs: one path type for local disks, `gs://` and `s3://`.

Everything a run reads or writes goes through `as_path`: a local name becomes a plain
`pathlib.Path` (local behaviour is unchanged), `gs://` and `s3://` an `etils.epath.Path`
backed by fsspec (gcsfs, s3fs: the `jaxlm[gcs]` and `jaxlm[s3]` extras). Code that may see
either uses only what both offer (open, read/write, exists, is_dir, iterdir, glob without
`**`, mkdir, unlink, `/`).
Credentials come from the standard environment: Google application default credentials for
GCS; AWS variables, profiles and instance roles for S3, with `AWS_ENDPOINT_URL` naming an
S3-compatible store (MinIO, Ceph, a test server). Nothing here logs a credential.

Object stores differ from disks in two ways that matter to a run, and the helpers below
hide both: an object can't be appended to (`append_text` rewrites the whole object, which
an object store replaces atomically), and there is no rename of a directory (writers put
each file whole; readers trust a file only once a manifest or commit file names it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path as LocalPath

import fsspec
from etils import epath

from jaxlm.errors import ConfigError

Path = epath.Path | LocalPath
PathLike = str | os.PathLike

# scheme -> (fsspec package the scheme needs, pip extra that installs it)
_SCHEMES = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}


def scheme(path: PathLike) -> str:
    """'gs', 's3', or '' for a local path."""
    text = os.fspath(path)
    head, sep, _ = text.partition("://")
    return head if sep else ""


def is_remote(path: PathLike) -> bool:
    """True for an object-store URL (gs://, s3://)."""
    return scheme(path) != ""


def as_path(path: PathLike, what: str = "path") -> Path:
    """`path` as an epath.Path; an unknown scheme or a missing client library is a
    ConfigError naming the value and the fix (`what` names the flag or key)."""
    text = os.fspath(path)
    s = scheme(text)
    if s:
        if s not in _SCHEMES:
            raise ConfigError(
                f"{what} '{text}' uses the scheme '{s}://', which jaxlm can't read or write; "
                f"use a local path, gs:// or s3://."
            )
        package, extra = _SCHEMES[s]
        try:
            __import__(package)
        except ImportError:
            raise ConfigError(
                f"{what} '{text}' needs the {package} package; install it with "
                f'pip install "jaxlm[{extra}]".'
            ) from None
        bucket = text[len(s) + 3 :].split("/", 1)[0]
        if not bucket:
            raise ConfigError(f"{what} '{text}' names no bucket; write {s}://BUCKET/PATH.")
        return epath.Path(text.rstrip("/"))
    return LocalPath(text)  # exactly pathlib, as before object stores


def bucket_of(path: PathLike) -> str:
    """The bucket URL of an object-store path ('s3://bucket')."""
    s = scheme(path)
    return f"{s}://{os.fspath(path)[len(s) + 3 :].split('/', 1)[0]}"


def check_reachable(path: PathLike, what: str) -> None:
    """For an object-store path, raise ConfigError in one sentence when its bucket can't be
    reached: no such bucket, no credentials, access denied, or no endpoint. Local: nothing."""
    if not is_remote(path):
        return
    bucket = bucket_of(path)
    as_path(path, what)  # the scheme and its client library
    try:
        # a fresh client: the check sees the credentials and endpoint as they are now
        fs, root = fsspec.core.url_to_fs(bucket, skip_instance_cache=True)
        fs.ls(root, detail=False)
        ok = True
    except FileNotFoundError:
        ok = False
    except Exception as e:  # noqa: BLE001  (each client raises its own family)
        raise ConfigError(f"{what} '{os.fspath(path)}': {_explain(e, bucket)}") from None
    if not ok:
        raise ConfigError(
            f"{what} '{os.fspath(path)}': the bucket {bucket} does not exist or is not visible "
            f"to these credentials; create it or name another."
        )


def _explain(e: BaseException, bucket: str) -> str:
    """One clause for a client error, without any credential in it."""
    name = type(e).__name__
    text = str(e).split("\n")[0][:200]
    if "NoCredentials" in name or "credential" in text.lower():
        return (
            f"no credentials were found for {bucket}; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or a profile) for s3://, or run "
            "`gcloud auth application-default login` for gs://."
        )
    if "Endpoint" in name or "connect" in text.lower() or isinstance(e, ConnectionError):
        return (
            f"{bucket} can't be reached ({name}); check the network and AWS_ENDPOINT_URL "
            "for an S3-compatible store."
        )
    if isinstance(e, PermissionError) or "denied" in text.lower() or "403" in text:
        return f"access to {bucket} is denied; grant these credentials access or name another."
    return f"{bucket} can't be used ({name}: {text}); check the bucket name and credentials."


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write `data` so that a reader sees the old file or the new one, never a part: locally
    through a private name and a rename (keeping the umask's mode); on an object store with
    one put, which the store makes atomic."""
    p = as_path(path)
    if is_remote(p):
        p.write_bytes(data)
        return
    tmp = os.path.join(os.path.dirname(os.fspath(p)) or ".", f".{p.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.fspath(p))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def append_text(path: PathLike, text: str, whole: list[str] | None = None) -> None:
    """Append `text` to a file. Locally: an append and an fsync. On an object store, which
    can't append, the object is rewritten from `whole` (every line written so far, kept by
    the caller) so a crash loses nothing that was already flushed."""
    p = as_path(path)
    if is_remote(p):
        if whole is None:
            whole = [p.read_text(encoding="utf-8")] if p.exists() else []
        whole.append(text)
        p.write_text("".join(whole), encoding="utf-8")
        return
    with open(os.fspath(p), "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def local_copy(path: PathLike, cache_dir: PathLike | None) -> LocalPath:
    """A local file with the bytes of `path`: the path itself when local, else a copy in
    `cache_dir` (made once, named by the URL, the object's size and its version, so an
    object rewritten since is fetched again). Reads stay memory-mapped and bounded whatever
    the file's size."""
    p = as_path(path)
    if not is_remote(p):
        return LocalPath(os.fspath(p))
    root = LocalPath(os.fspath(cache_dir) if cache_dir else default_cache_dir())
    fs, name = _store(p)
    info = fs.info(name)
    size = int(info["size"])
    # S3's ETag, GCS's generation: each changes whenever the object is written again
    version = next((str(info[k]) for k in _VERSION_KEYS if info.get(k)), "")
    key = hashlib.sha256(f"{os.fspath(p)}\0{size}\0{version}".encode()).hexdigest()[:16]
    dest = root / key / p.name
    if dest.is_file() and dest.stat().st_size == size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        with p.open("rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


_VERSION_KEYS = ("ETag", "generation", "md5Hash", "crc32c", "LastModified", "mtime", "updated")


def default_cache_dir() -> LocalPath:
    """Where object-store files are cached when `data.cache_dir` is not set."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return LocalPath(base) / "jaxlm" / "objects"


@contextlib.contextmanager
def local_file_for_writing(path: PathLike) -> Iterator[LocalPath]:
    """A local file name to write (for libraries that only write to disk); on leaving, an
    object-store target receives the file with one put."""
    p = as_path(path)
    if not is_remote(p):
        yield LocalPath(os.fspath(p))
        return
    with tempfile.TemporaryDirectory(prefix="jaxlm-upload-") as d:
        local = LocalPath(d) / p.name
        yield local
        p.write_bytes(local.read_bytes())


def move(src: PathLike, dst: PathLike) -> None:
    """Move a file or directory tree; on an object store (no rename) it is copied, then the
    source deleted."""
    if is_remote(src):
        fs, source = _store(src)
        _, target = _store(dst)
        files = fs.find(source)  # objects only: "directories" are key prefixes, not objects
        for f in files:
            fs.copy(f, target + f[len(source) :])
        if files:
            fs.rm(files)
        return
    shutil.move(os.fspath(src), os.fspath(dst))


def _store(path: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec client that epath uses for an object-store URL, and the URL's key: one
    client, so one listing cache, which a delete through another client would leave stale
    (gcsfs caches listings per client, and epath makes its gs:// client with other options)."""
    fs = epath.backend.fsspec_backend.fs(os.fspath(path))
    return fs, fs._strip_protocol(os.fspath(path))


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copy one file between any two places (local, gs://, s3://)."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copyfile(os.fspath(src), os.fspath(dst))
        return
    as_path(dst).write_bytes(as_path(src).read_bytes())


def absolute(path: PathLike) -> Path:
    """An absolute path (an object-store URL already is one)."""
    p = as_path(path)
    return p if is_remote(p) else p.absolute()


def read_text(path: PathLike) -> str:
    """A UTF-8 file's text; an object is fetched with one request, so a writer replacing it
    meanwhile yields the old or the new version, never a mix."""
    if is_remote(path):
        fs, key = _store(path)
        return fs.cat_file(key).decode("utf-8")
    return LocalPath(os.fspath(path)).read_text(encoding="utf-8")

"""Shared storage every node reaches: a mounted folder (NFS, EFS, a ReadWriteMany volume) or an
object-store URI (``s3://bucket/prefix``; any scheme pyarrow's filesystems know, e.g. ``gs://``).

Ray Tune writes its own state to either (``storage_path``). The study's own shared files (the cohort,
pre-training checkpoints, fine-tuned models) go through this module: with a folder they are plain
paths; with a URI a writer uploads its file, and a reader downloads it once per node into a local cache
(``$STUDY_NODE_CACHE``, default ``~/.cache/pcs-study``) and reads the local copy. Downloads land under a
temporary name and are renamed into place, so trials running side by side on one node never read a
half-downloaded file. Credentials and endpoints come from the usual environment (``AWS_*`` variables,
``AWS_ENDPOINT_URL`` for an S3-compatible server such as MinIO).

No Ray or MLflow here; pyarrow (installed with Ray) is imported only when a URI is used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from trainables.atomic import atomic_write
from trainables.errors import StudyInputError


def is_remote(location: str | os.PathLike | None) -> bool:
    """True for an object-store URI (``scheme://...``), False for a path (or a ``file://`` URI)."""
    text = os.fspath(location) if location is not None else ""
    return "://" in text and not text.startswith("file://")


def absolute(location: str | os.PathLike) -> str:
    """A URI as it is; a path made absolute (so it names the same folder from any working directory)."""
    text = os.fspath(location)
    return text.rstrip("/") if is_remote(text) else str(Path(text).expanduser().resolve())


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` for a URI or a path."""
    if is_remote(location):
        return "/".join([os.fspath(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location).joinpath(*parts))


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for bad schemes and buckets
        raise StudyInputError(f"cannot open storage {uri!r}: {' '.join(str(exc).split())[:200]}") from None


def exists(location: str | os.PathLike) -> bool:
    """Whether a file exists at ``location``."""
    if not is_remote(location):
        return Path(location).is_file()
    import pyarrow.fs as pafs

    fs, path = _filesystem(os.fspath(location))
    return fs.get_file_info(path).type == pafs.FileType.File


def put_file(local: str | os.PathLike, location: str | os.PathLike) -> str:
    """Copy the local file to ``location`` (an upload for a URI); returns ``location``."""
    if not is_remote(location):
        target = Path(location)
        if Path(local).resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda tmp: shutil.copyfile(local, tmp))
        return str(target)
    fs, path = _filesystem(os.fspath(location))
    with open(local, "rb") as src, fs.open_output_stream(path, compression=None) as dst:  # an object appears whole or not at all
        shutil.copyfileobj(src, dst, 1 << 20)
    return os.fspath(location)


def put_tree(local_dir: str | os.PathLike, location: str, skip: tuple[str, ...] = (".cache",)) -> str:
    """Upload every file under ``local_dir`` to ``location`` (top-level names in ``skip`` left out)."""
    root = Path(local_dir)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] not in skip:
            put_file(path, join(location, *rel.parts))
    return location


def node_cache() -> Path:
    """This node's folder for downloaded copies."""
    return Path(os.environ.get("STUDY_NODE_CACHE") or Path.home() / ".cache" / "pcs-study").expanduser()


def local_mirror(location: str) -> Path:
    """This node's folder for downloaded copies of what lies under ``location``."""
    return node_cache() / hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:20]


def get_file(location: str, target: str | os.PathLike) -> Path:
    """Download the object at ``location`` to ``target`` (unless a copy of the same size is there)."""
    target = Path(target)
    fs, path = _filesystem(location)
    info = fs.get_file_info(path)
    if info.size is None:
        raise StudyInputError(f"{location} does not exist in the shared storage")
    if target.is_file() and target.stat().st_size == info.size:
        return target  # downloaded before (a rewritten object of another size is downloaded again)
    target.parent.mkdir(parents=True, exist_ok=True)

    def download(tmp: Path) -> None:
        with fs.open_input_stream(path, compression=None) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    return atomic_write(target, download)


def fetch(location: str | os.PathLike) -> Path:
    """A local path of the file at ``location``: the path itself, or this node's downloaded copy."""
    if not is_remote(location):
        return Path(location)
    uri = os.fspath(location)
    return get_file(uri, local_mirror(uri) / uri.rstrip("/").rsplit("/", 1)[-1])


def find(location: str | os.PathLike | None) -> Path | None:
    """Like :func:`fetch`, but ``None`` when nothing is at ``location`` (a local path may be a folder)."""
    if not location:
        return None
    try:
        path = fetch(location)
    except StudyInputError:  # not in the object store
        return None
    return path if path.exists() else None


def fetch_tree(location: str) -> Path:
    """A local folder holding every file under ``location`` (downloaded once per node for a URI)."""
    if not is_remote(location):
        return Path(location)
    import pyarrow.fs as pafs

    target = local_mirror(location)
    if target.is_dir():
        return target
    fs, path = _filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise StudyInputError(f"{location} does not exist in the shared storage")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            os.rename(tmp, target)  # another process on this node may have finished first: keep its copy
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_storage(location: str, flag: str) -> None:
    """Write and delete a probe object, so a wrong bucket, endpoint or credential fails before any trial."""
    if not is_remote(location):
        return
    fs, path = _filesystem(location)
    probe = f"{path.rstrip('/')}/.pcs-study-probe-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except Exception as exc:
        raise StudyInputError(
            f"{flag} {location!r}: cannot write there ({' '.join(str(exc).split())[:200]}); check the bucket "
            "name, the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or a profile) and, for an "
            "S3-compatible server, AWS_ENDPOINT_URL"
        ) from None

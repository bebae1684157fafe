"""The artifact store: where a job's output files live once the worker has published them.

Two backends behind one small interface, importable by the API and the worker alike (no torch):

- ``LocalStore`` (the embedded default): ``MOPEQ_ARTIFACT_DIR/<job id>/<name>``. The engine writes there directly and
  the API streams the files; API and workers must then share that directory.
- ``S3Store``, selected by ``MOPEQ_ARTIFACT_STORE=s3://BUCKET/PREFIX`` and configured by the standard
  ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``. The engine writes
  into the worker's own working directory; the worker uploads every file (multipart from
  ``MOPEQ_S3_MULTIPART_THRESHOLD_MB``) under ``PREFIX/<job id>/a<attempt>/<name>`` with its SHA-256 in the object's
  metadata, and the API answers downloads with a redirect to a presigned URL. Nothing but the database, the broker
  and the bucket is shared.

Visibility is the database's business: a job's artifact rows are written in one transaction after
:meth:`ArtifactStore.publish` has returned, so a file is downloadable only once every file of the job is stored.
Objects of an interrupted attempt (other ``a<attempt>`` prefixes, unfinished multipart uploads) are never listed and
are removed by :meth:`ArtifactStore.prune` when a later attempt publishes, or with the job.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from app.core.config import Settings

log = logging.getLogger("mopeq.storage")
OnFile = Callable[[str, int, int], None]  # (name, files done, files in all), called after each stored file


@dataclass(frozen=True)
class StoredFile:
    name: str  # path relative to the job's output folder, POSIX separators
    uri: str  # file:///... or s3://bucket/key
    sha256: str
    bytes: int


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def output_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


class ArtifactStore:
    kind = "abstract"

    def output_dir(self, job_id: str) -> Path:
        """Where the worker's engine writes the job's files before :meth:`publish`."""
        raise NotImplementedError

    def publish(self, job_id: str, attempt: int, folder: Path, on_file: OnFile | None = None) -> list[StoredFile]:
        """Store every file of ``folder`` (the job's output); return them with their checksums. Raises on any
        failure: the caller records no artifact row then."""
        raise NotImplementedError

    def prune(self, job_id: str, keep: list[StoredFile]) -> int:
        """Remove the job's stored objects that ``keep`` does not list (earlier attempts). Returns how many."""
        return 0

    def delete_job(self, job_id: str) -> int:
        """Remove everything stored for the job. Returns how many objects (files) went."""
        raise NotImplementedError

    def read_bytes(self, job_id: str, name: str, uri: str) -> bytes:
        """One stored file's bytes (small files: the bit map)."""
        raise NotImplementedError

    def local_path(self, job_id: str, name: str) -> Path | None:
        """The file to stream (local store), or None where downloads go through :meth:`presigned_url`."""
        return None

    def presigned_url(self, uri: str, filename: str) -> str | None:
        return None

    def used_bytes(self, exclude_job: str | None = None) -> int:
        raise NotImplementedError

    def check(self) -> None:
        """Raise if the store cannot be reached (readiness)."""


class LocalStore(ArtifactStore):
    kind = "local"

    def __init__(self, root: Path):
        self.root = root

    def output_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def publish(self, job_id: str, attempt: int, folder: Path, on_file: OnFile | None = None) -> list[StoredFile]:
        files = output_files(folder)
        out = []
        for i, p in enumerate(files, 1):
            out.append(StoredFile(p.relative_to(folder).as_posix(), p.resolve().as_uri(), sha256_file(p),
                                  p.stat().st_size))
            if on_file is not None:
                on_file(out[-1].name, i, len(files))
        return out

    def delete_job(self, job_id: str) -> int:
        path = self.root / job_id
        n = len(output_files(path)) if path.is_dir() else 0
        shutil.rmtree(path, ignore_errors=True)
        return n

    def read_bytes(self, job_id: str, name: str, uri: str) -> bytes:
        # by name under this process's own root: the row's uri is the worker's path, which may be mounted elsewhere
        path = self.local_path(job_id, name)
        if path is None:
            raise FileNotFoundError(f"{job_id}/{name}")
        return path.read_bytes()

    def local_path(self, job_id: str, name: str) -> Path | None:
        base = (self.root / job_id).resolve()
        path = (base / name).resolve()
        return path if path.is_relative_to(base) and path.is_file() else None

    def used_bytes(self, exclude_job: str | None = None) -> int:
        used = tree_bytes(self.root)
        return used - tree_bytes(self.root / exclude_job) if exclude_job else used

    def check(self) -> None:
        if not self.root.is_dir():
            raise OSError(f"artifact directory {self.root} is missing")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (the key or prefix without surrounding slashes)."""
    if not url.lower().startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[5:].partition("/")
    return bucket, key.strip("/")


class S3Store(ArtifactStore):
    kind = "s3"

    def __init__(self, url: str, work_dir: Path, *, multipart_threshold: int = 64 << 20,
                 multipart_chunk: int = 64 << 20, presign_expires_s: int = 900, public_endpoint: str | None = None):
        self.bucket, self.prefix = parse_s3_url(url)
        self.work_dir = work_dir
        self.multipart_threshold, self.multipart_chunk = multipart_threshold, multipart_chunk
        self.presign_expires_s = presign_expires_s
        self.public_endpoint = public_endpoint or None
        self._client: Any = None
        self._presigner: Any = None
        self._lock = threading.Lock()

    # boto3 reads AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION itself.
    def _make_client(self, endpoint: str | None = None) -> Any:
        import boto3
        from botocore.config import Config

        path_style = bool(endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"))
        cfg = Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"},
                     s3={"addressing_style": "path" if path_style else "auto"},
                     connect_timeout=5, read_timeout=60)
        kw: dict[str, Any] = {"config": cfg}
        if endpoint:
            kw["endpoint_url"] = endpoint
        return boto3.session.Session().client("s3", **kw)

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    @property
    def presigner(self) -> Any:
        """Signs download URLs with the endpoint clients reach (MOPEQ_S3_PUBLIC_ENDPOINT_URL, when the API reaches
        the store at an internal address); signing needs no request."""
        if not self.public_endpoint:
            return self.client
        with self._lock:
            if self._presigner is None:
                self._presigner = self._make_client(self.public_endpoint)
            return self._presigner

    def job_prefix(self, job_id: str) -> str:
        return f"{self.prefix}/{job_id}/" if self.prefix else f"{job_id}/"

    def key(self, job_id: str, attempt: int, name: str) -> str:
        return f"{self.job_prefix(job_id)}a{attempt}/{name}"

    def output_dir(self, job_id: str) -> Path:
        return self.work_dir / job_id / "out"

    def _abort_multipart(self, job_id: str) -> int:
        n = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.job_prefix(job_id)):
            for up in page.get("Uploads", []) or []:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                n += 1
        return n

    def publish(self, job_id: str, attempt: int, folder: Path, on_file: OnFile | None = None) -> list[StoredFile]:
        from boto3.s3.transfer import TransferConfig

        aborted = self._abort_multipart(job_id)  # an earlier attempt that died mid-part
        if aborted:
            log.info("job %s: aborted %d unfinished multipart uploads of an earlier attempt", job_id, aborted)
        tc = TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=self.multipart_chunk,
                            max_concurrency=4, use_threads=True)
        files = output_files(folder)
        out: list[StoredFile] = []
        for i, p in enumerate(files, 1):
            name = p.relative_to(folder).as_posix()
            digest, size = sha256_file(p), p.stat().st_size
            key = self.key(job_id, attempt, name)
            extra = {"Metadata": {"sha256": digest},
                     "ContentType": mimetypes.guess_type(name)[0] or "application/octet-stream"}
            self.client.upload_file(str(p), self.bucket, key, ExtraArgs=extra, Config=tc)
            out.append(StoredFile(name, f"s3://{self.bucket}/{key}", digest, size))
            if on_file is not None:
                on_file(name, i, len(files))
        return out

    def _keys(self, job_id: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                         Prefix=self.job_prefix(job_id)):
            keys += [o["Key"] for o in page.get("Contents", []) or []]
        return keys

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            res = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if res.get("Errors"):
                raise OSError(f"could not delete {len(res['Errors'])} objects, e.g. {res['Errors'][0]}")

    def prune(self, job_id: str, keep: list[StoredFile]) -> int:
        wanted = {parse_s3_url(f.uri)[1] for f in keep}
        stale = [k for k in self._keys(job_id) if k not in wanted]
        self._delete_keys(stale)
        self._abort_multipart(job_id)
        return len(stale)

    def delete_job(self, job_id: str) -> int:
        keys = self._keys(job_id)
        self._delete_keys(keys)
        self._abort_multipart(job_id)
        shutil.rmtree(self.work_dir / job_id, ignore_errors=True)
        return len(keys)

    def read_bytes(self, job_id: str, name: str, uri: str) -> bytes:
        bucket, key = parse_s3_url(uri)
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def presigned_url(self, uri: str, filename: str) -> str | None:
        bucket, key = parse_s3_url(uri)
        disposition = f"attachment; filename*=UTF-8''{quote(filename)}"
        return self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key, "ResponseContentDisposition": disposition},
            ExpiresIn=self.presign_expires_s)

    def used_bytes(self, exclude_job: str | None = None) -> int:
        total = 0
        skip = self.job_prefix(exclude_job) if exclude_job else None
        base = f"{self.prefix}/" if self.prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for o in page.get("Contents", []) or []:
                if skip is None or not o["Key"].startswith(skip):
                    total += int(o["Size"])
        return total

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


_stores: dict[tuple[Any, ...], ArtifactStore] = {}
_stores_lock = threading.Lock()


def get_store(settings: Settings) -> ArtifactStore:
    """The store the settings select (one per process and configuration: boto3 clients are thread-safe)."""
    public = settings.S3_PUBLIC_ENDPOINT_URL or None
    ident = (settings.ARTIFACT_STORE, str(settings.artifact_dir), str(settings.work_dir),
             settings.S3_MULTIPART_THRESHOLD_MB, settings.S3_MULTIPART_CHUNK_MB, settings.S3_PRESIGN_EXPIRES_S, public)
    with _stores_lock:
        store = _stores.get(ident)
        if store is None:
            if settings.artifact_store_is_s3:
                store = S3Store(settings.ARTIFACT_STORE, settings.work_dir,
                                multipart_threshold=settings.S3_MULTIPART_THRESHOLD_MB << 20,
                                multipart_chunk=settings.S3_MULTIPART_CHUNK_MB << 20,
                                presign_expires_s=settings.S3_PRESIGN_EXPIRES_S, public_endpoint=public)
            else:
                store = LocalStore(settings.artifact_dir)
            _stores[ident] = store
        return store

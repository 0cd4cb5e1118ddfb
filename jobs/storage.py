"""The artifact store: the local directory ARTIFACT_ROOT (default) or an S3-compatible bucket, so web
and GPU workers on different hosts share finished checkpoints.

``COMPRESSOR_ARTIFACT_STORE``: ``local`` or ``s3://<bucket>[/<prefix>]``; ``COMPRESSOR_S3_ENDPOINT_URL``
for MinIO/Ceph/moto (empty: AWS); credentials from boto3's usual chain (``AWS_ACCESS_KEY_ID`` ...);
``COMPRESSOR_S3_PRESIGN_SECONDS`` (> 0: downloads redirect to a presigned URL valid that long; 0: the
web server streams the object).

With a bucket, the worker still builds the artifact locally (temp dir renamed into place, as
always), then uploads it as ONE object ``<prefix><job id>.tar`` through a multipart upload: S3 makes
an object visible only when the upload is completed, and any failure aborts the upload, so no
half-written object is ever visible. Only then does the job succeed (the object's key goes into
``results.artifact.store``) and the worker's local copy is removed. A failed upload fails the job.
"""
from __future__ import annotations

import contextlib
import logging
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from .archive import artifact_path, stream_tar

log = logging.getLogger(__name__)

PART_BYTES = 8 * 1024 * 1024  # S3 parts are at least 5 MiB, except the last
SETTING = "COMPRESSOR_ARTIFACT_STORE"


class StoreError(RuntimeError):
    """The object store refused or could not be reached; the message names the setting."""


@dataclass(frozen=True)
class S3Store:
    bucket: str
    prefix: str

    def key(self, job_id: Any) -> str:
        return f"{self.prefix}{job_id}.tar"


def configured_store() -> S3Store | None:
    """The bucket named by COMPRESSOR_ARTIFACT_STORE, or None for the local directory."""
    value = (getattr(settings, SETTING, "") or "local").strip()
    if value == "local":
        return None
    if not value.startswith("s3://") or not value[5:].split("/")[0]:
        raise ImproperlyConfigured(f"{SETTING} must be 'local' or s3://<bucket>[/<prefix>], got {value!r}")
    bucket, _, prefix = value[5:].partition("/")
    prefix = prefix.strip("/")
    return S3Store(bucket=bucket, prefix=f"{prefix}/" if prefix else "")


def _endpoint() -> str | None:
    return getattr(settings, "COMPRESSOR_S3_ENDPOINT_URL", "") or None


def client():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=_endpoint(), region_name=getattr(settings, "COMPRESSOR_S3_REGION", None)
                        or None, config=Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 2},
                                               signature_version="s3v4"))


def _where(store: S3Store) -> str:
    endpoint = _endpoint() or "AWS S3"
    return (f"the object store s3://{store.bucket} at {endpoint} ({SETTING}"
            + (", COMPRESSOR_S3_ENDPOINT_URL" if _endpoint() else "") + ")")


def check_store() -> None:
    """At start-up: the configured bucket must be reachable and exist. ImproperlyConfigured names the
    setting otherwise, so a web server or worker with a wrong store never starts taking jobs."""
    store = configured_store()
    if store is None:
        return
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client().head_bucket(Bucket=store.bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        raise ImproperlyConfigured(f"{_where(store)} refused access to the bucket ({code}); check the bucket "
                                   "name and the AWS_* credentials") from None
    except BotoCoreError as exc:
        raise ImproperlyConfigured(f"cannot reach {_where(store)}: {exc}") from None


# ----------------------------------------------------------------------------- worker side

def commit_artifact(job_id: Any, local_dir: Path, results: dict) -> dict:
    """Upload ``local_dir`` as the job's tar object when a bucket is configured; returns ``results``
    with ``artifact.store`` set, and removes the local copy only after the object is complete.
    With the local store nothing happens."""
    store = configured_store()
    if store is None:
        return results
    import shutil

    key = store.key(job_id)
    size = upload_stream(store, key, stream_tar(local_dir, f"compressor-{job_id}"))
    artifact = dict(results.get("artifact") or {})
    artifact["store"] = {"kind": "s3", "bucket": store.bucket, "key": key, "tar_bytes": size}
    shutil.rmtree(local_dir, ignore_errors=True)
    log.info("job %s artifact uploaded to s3://%s/%s (%d bytes)", job_id, store.bucket, key, size)
    return {**results, "artifact": artifact}


def upload_stream(store: S3Store, key: str, chunks: Iterator[bytes]) -> int:
    """Multipart upload of ``chunks`` to ``key``: visible only once completed, aborted on any error."""
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = client()
    try:
        upload_id = s3.create_multipart_upload(Bucket=store.bucket, Key=key,
                                               ContentType="application/x-tar")["UploadId"]
    except (BotoCoreError, ClientError) as exc:
        raise StoreError(f"could not start the upload to {_where(store)}: {exc}") from exc
    parts, buffer, total = [], bytearray(), 0
    try:
        def send(data: bytes) -> None:
            number = len(parts) + 1
            etag = s3.upload_part(Bucket=store.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                  Body=bytes(data))["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})

        for chunk in chunks:
            buffer += chunk
            total += len(chunk)
            while len(buffer) >= PART_BYTES:
                send(buffer[:PART_BYTES])
                del buffer[:PART_BYTES]
        if buffer or not parts:
            send(buffer)
        s3.complete_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload_id,
                                     MultipartUpload={"Parts": parts})
    except BaseException as exc:
        with contextlib.suppress(Exception):
            s3.abort_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload_id)
        if isinstance(exc, (BotoCoreError, ClientError)):
            raise StoreError(f"upload of {key} to {_where(store)} failed: {exc}") from exc
        raise
    return total


# ----------------------------------------------------------------------------- web side

def stored_object(job: Any) -> dict | None:
    """``{"bucket", "key", ...}`` of a succeeded job whose artifact lives in the bucket, else None."""
    if getattr(job, "status", None) != "succeeded":
        return None
    store = ((job.results or {}).get("artifact") or {}).get("store")
    if isinstance(store, dict) and store.get("kind") == "s3" and store.get("key") and store.get("bucket"):
        return store
    return None


def download_response(job: Any, filename: str):
    """A redirect to a presigned URL (or a stream of the object) for a job stored in a bucket; None
    for a job whose artifact is local."""
    obj = stored_object(job)
    if obj is None:
        return None
    from django.http import HttpResponseRedirect, StreamingHttpResponse

    s3 = client()
    seconds = int(getattr(settings, "COMPRESSOR_S3_PRESIGN_SECONDS", 3600) or 0)
    disposition = f'attachment; filename="{filename}"'
    if seconds > 0:
        url = s3.generate_presigned_url("get_object", ExpiresIn=seconds, Params={
            "Bucket": obj["bucket"], "Key": obj["key"], "ResponseContentDisposition": disposition})
        return HttpResponseRedirect(url)
    body = s3.get_object(Bucket=obj["bucket"], Key=obj["key"])
    response = StreamingHttpResponse(body["Body"].iter_chunks(1 << 20), content_type="application/x-tar")
    response["Content-Disposition"] = disposition
    response["Content-Length"] = str(body["ContentLength"])
    return response


@contextlib.contextmanager
def local_copy(job: Any) -> Iterator[Path | None]:
    """The job's artifact as a local directory: the real one for the local store, a temporary
    extraction of the bucket's tar otherwise (regular files only, nothing outside the temp dir)."""
    obj = stored_object(job)
    if obj is None:
        yield artifact_path(job)
        return
    with tempfile.TemporaryDirectory(prefix="compressor-artifact-") as tmp:
        body = client().get_object(Bucket=obj["bucket"], Key=obj["key"])["Body"]
        with tarfile.open(fileobj=body, mode="r|") as tar:
            tar.extractall(tmp, filter="data")
        dirs = [p for p in Path(tmp).iterdir() if p.is_dir()]
        yield dirs[0] if len(dirs) == 1 else None

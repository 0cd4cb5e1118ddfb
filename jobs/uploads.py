"""Uploaded calibration files: size-limited while streaming in, checked, then stored atomically.

The flow is the same for the form and the REST API:

1. `LimitedUploadHandler` (settings.FILE_UPLOAD_HANDLERS) counts the bytes of every uploaded file
   as they arrive; past ``COMPRESSOR_MAX_UPLOAD_BYTES`` it drops the file (Django discards the rest
   of the stream and deletes the temporary file) and notes the field on the request.
2. `store_upload` checks the content (suffix, UTF-8, parseable records with text in them), writes
   it to ``UPLOAD_ROOT/<owner>/<id><suffix>`` through a temporary name and a rename, and only then
   creates the `CalibrationUpload` row. A failure at any step leaves neither file nor row.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import SkipFile, TemporaryFileUploadHandler
from django.db import transaction

from .errors import SubmissionError, UploadInUse
from .models import ACTIVE, CalibrationUpload, Job

ALLOWED_SUFFIXES = (".jsonl", ".json", ".txt")
# Written by the web server, read by the worker: the same shared-group policy as the artifacts
# (compression.model_io.export.ARTIFACT_FILE_MODE; docs/architecture.md, "File permissions").
UPLOAD_FILE_MODE = 0o640
UPLOAD_DIR_MODE = 0o750
OVERSIZE_ATTR = "compressor_oversized_uploads"


def limit_text(limit: int | None = None) -> str:
    limit = settings.COMPRESSOR_MAX_UPLOAD_BYTES if limit is None else limit
    return f"{limit / 2**20:.0f} MiB" if limit >= 2**20 else f"{limit} bytes"


class LimitedUploadHandler(TemporaryFileUploadHandler):
    """Streams uploads to a temporary file, refusing any file past the configured size."""

    def new_file(self, field_name, *args, **kwargs):
        self.received = 0
        self.limit = settings.COMPRESSOR_MAX_UPLOAD_BYTES
        return super().new_file(field_name, *args, **kwargs)

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.received > self.limit:
            if self.request is not None:
                oversized = getattr(self.request, OVERSIZE_ATTR, set())
                oversized.add(self.field_name)
                setattr(self.request, OVERSIZE_ATTR, oversized)
            raise SkipFile(f"{self.file_name!r} is larger than {self.limit} bytes")
        return super().receive_data_chunk(raw_data, start)


class UploadTooLarge(SubmissionError):
    """A file above COMPRESSOR_MAX_UPLOAD_BYTES (the API answers 413)."""

    def __init__(self, field: str):
        super().__init__(field, f"the file is larger than the upload limit of {limit_text()}")


def store_request_upload(request: Any, owner: Any, field: str, *, required: bool = True) -> CalibrationUpload | None:
    """The file in ``field`` of a Django request's multipart body, checked and kept for ``owner``;
    None when the field is empty and not ``required``. Raises SubmissionError (UploadTooLarge for a
    file the handler dropped while it streamed in)."""
    files = request.FILES  # parsing the body runs LimitedUploadHandler
    if field in getattr(request, OVERSIZE_ATTR, ()):
        raise UploadTooLarge(field)
    if field not in files:
        if required:
            raise SubmissionError(field, f"no file uploaded; send multipart/form-data with the file in the "
                                         f"field '{field}'")
        return None
    return store_upload(owner, files[field], field)


def _display_name(name: str) -> str:
    """The client's file name reduced to a safe label: no directories, no control characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    clean = "".join(ch for ch in base if ch.isprintable()).strip()
    return clean[:255] or "upload"


def check_content(uploaded: UploadedFile, field: str) -> tuple[str, int, bytes]:
    """(suffix, usable records, content) of an uploaded calibration file, or a SubmissionError."""
    from compression.calibration import parse_records, record_text
    from compression.errors import CalibrationError

    name = _display_name(uploaded.name or "")
    suffix = Path(name).suffix.lower()
    if suffix not in ALLOWED_SUFFIXES:
        raise SubmissionError(field, f"{name!r}: the file must end in {', '.join(ALLOWED_SUFFIXES)} "
                                     "(JSON lines, a JSON list of records, or plain text)")
    if uploaded.size > settings.COMPRESSOR_MAX_UPLOAD_BYTES:
        raise UploadTooLarge(field)
    content = b"".join(uploaded.chunks())
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SubmissionError(field, f"{name!r} is not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        records = parse_records(text, suffix)
    except CalibrationError as exc:
        raise SubmissionError(field, f"{name!r}: {exc.message}") from None
    usable = sum(1 for record in records if record_text(record, None)[0].strip())
    if not usable:
        what = ("paragraphs of more than 200 characters" if suffix == ".txt"
                else "records with a text, instruction, question or messages field")
        raise SubmissionError(field, f"{name!r} holds no usable calibration text: expected {what}")
    return suffix, usable, content


def store_upload(owner: Any, uploaded: UploadedFile, field: str = "file") -> CalibrationUpload:
    """Check and keep one uploaded calibration file for ``owner``."""
    count = CalibrationUpload.objects.filter(owner=owner).count()
    if count >= settings.COMPRESSOR_MAX_UPLOADS_PER_USER:
        raise SubmissionError(field, f"you already have {count} uploaded calibration files (limit "
                                     f"{settings.COMPRESSOR_MAX_UPLOADS_PER_USER})")
    suffix, records, content = check_content(uploaded, field)
    upload = CalibrationUpload(owner=owner, filename=_display_name(uploaded.name or ""), suffix=suffix,
                               size=len(content), records=records, sha256=hashlib.sha256(content).hexdigest())
    directory = upload.directory
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(UPLOAD_DIR_MODE | (directory.stat().st_mode & 0o2000))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".incoming-")
    try:
        os.fchmod(fd, UPLOAD_FILE_MODE)  # mkstemp makes 0600, which the worker's user could not read
        with os.fdopen(fd, "wb") as out:
            out.write(content)
        with transaction.atomic():
            upload.save()
            os.replace(tmp, upload.path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return upload


def resolve_source(owner_id: Any, source: str) -> CalibrationUpload | None:
    """The owner's upload a ``upload:<id>`` source names, or None when it names none of theirs."""
    import uuid

    if not source.startswith(CalibrationUpload.SOURCE_PREFIX):
        return None
    try:
        upload_id = uuid.UUID(source[len(CalibrationUpload.SOURCE_PREFIX):])
    except ValueError:
        return None
    return CalibrationUpload.objects.filter(pk=upload_id, owner_id=owner_id).first()


def delete_upload(upload: CalibrationUpload) -> None:
    """Delete an upload (row, then its file once the deletion is committed), unless a queued or
    running job of its owner still calibrates on it."""
    users = Job.objects.filter(owner_id=upload.owner_id, status__in=ACTIVE, calibration__source=upload.source)
    if job := users.first():
        raise UploadInUse(f"job {job.id} ({job.status}) still uses this file; wait for it or cancel it first")
    path = upload.path
    with transaction.atomic():
        upload.delete()
        transaction.on_commit(lambda: path.unlink(missing_ok=True))

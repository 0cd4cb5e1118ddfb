"""A body sent without a Content-Length (Transfer-Encoding: chunked, as gunicorn hands it on) is
counted while it streams in: past the limit it is a 413 after reading at most one chunk more than
the limit, under it the request is handled as if its length had been declared (Django's WSGI request
would otherwise read it as empty)."""
from __future__ import annotations

import io
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test.client import BOUNDARY, MULTIPART_CONTENT, encode_multipart
from django.urls import reverse

from jobs.middleware import CHUNK
from jobs.models import CalibrationUpload, Job

from .conftest import errors

pytestmark = pytest.mark.django_db

UPLOADS = "/api/calibration-files"
RECORDS = "\n".join(json.dumps({"text": f"Calibration sample {i}: the quick brown fox jumps over the lazy dog."})
                    for i in range(5)).encode()


class CountingInput(io.BytesIO):
    """A WSGI input that remembers how many bytes were read from it."""

    consumed = 0

    def read(self, size=-1):
        data = super().read(size)
        self.consumed += len(data)
        return data


def chunked(client, path: str, body: bytes, content_type: str):
    """`body` sent the way gunicorn passes a chunked request on: no CONTENT_LENGTH, the decoded body
    on wsgi.input, the Transfer-Encoding header."""
    stream = CountingInput(body)
    response = client.generic("POST", path, b"", content_type=content_type, HTTP_TRANSFER_ENCODING="chunked",
                              **{"wsgi.input": stream, "CONTENT_TYPE": content_type})
    return response, stream


def multipart_file(content: bytes, name: str = "mine.jsonl") -> bytes:
    return encode_multipart(BOUNDARY, {"file": SimpleUploadedFile(name, content)})


@pytest.fixture
def limits(settings, tmp_path):
    settings.UPLOAD_ROOT = tmp_path / "uploads"
    settings.COMPRESSOR_MAX_UPLOAD_BYTES = 1000
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    return 2000  # the multipart limit: the file plus the form's fields


def test_a_chunked_upload_past_the_limit_is_a_413_read_no_further_than_one_chunk(api, limits):
    body = multipart_file(b'{"text": "x"}\n' * 200_000)  # 2.8 MB, far past the limit
    response, stream = chunked(api, UPLOADS, body, MULTIPART_CONTENT)
    assert response.status_code == 413 and response["Content-Type"] == "application/json"
    assert f"larger than the limit of {limits} bytes" in errors(response)[None]
    assert stream.consumed <= limits + CHUNK
    assert not CalibrationUpload.objects.exists()


def test_a_chunked_upload_under_the_limit_is_read_and_stored(api, limits, owner):
    response, _ = chunked(api, UPLOADS, multipart_file(RECORDS), MULTIPART_CONTENT)
    assert response.status_code == 201, response.content
    assert response.json()["records"] == 5
    assert CalibrationUpload.objects.get(owner=owner).path.read_bytes() == RECORDS


def test_a_chunked_json_body_past_the_limit_is_a_413_and_under_it_is_parsed(api, limits, monkeypatch):
    big = json.dumps({"model": "demo", "recipe": {"preset": "FP8_DYNAMIC"}, "name": "x" * 5000}).encode()
    response, stream = chunked(api, "/api/jobs", big, "application/json")
    assert response.status_code == 413 and "larger than the limit of 1000 bytes" in errors(response)[None]
    assert not Job.objects.exists()
    # under the limit the body arrives: a field error about its content, not "no body"
    response, _ = chunked(api, "/api/jobs", json.dumps({"model": "demo", "recipe": {"preset": "NOPE"}}).encode(),
                          "application/json")
    assert response.status_code == 400 and "recipe.preset" in errors(response), response.content


def test_a_chunked_form_post_past_the_limit_is_a_413(client, owner, limits):
    client.force_login(owner)
    body = multipart_file(RECORDS * 100)  # 40 kB
    response, stream = chunked(client, reverse("calibration-files"), body, MULTIPART_CONTENT)
    assert response.status_code == 413 and response["Content-Type"].startswith("text/plain")
    assert stream.consumed <= limits + CHUNK
    assert not CalibrationUpload.objects.exists()
    response, _ = chunked(client, reverse("calibration-files"), multipart_file(RECORDS), MULTIPART_CONTENT)
    assert response.status_code == 302 and CalibrationUpload.objects.filter(owner=owner).count() == 1

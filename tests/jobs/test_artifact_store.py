"""The S3 artifact store against a real S3-compatible server (moto's server mode, started here)."""
from __future__ import annotations

import io
import tarfile

import pytest
import requests
from django.core.exceptions import ImproperlyConfigured

from jobs import storage
from jobs.models import Status
from tests.conftest import PASSWORD, free_port
from tests.jobs.factories import make_job

BUCKET = "compressor-artifacts"


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server, settings, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    settings.COMPRESSOR_ARTIFACT_STORE = f"s3://{BUCKET}/artifacts"
    settings.COMPRESSOR_S3_ENDPOINT_URL = s3_server
    settings.COMPRESSOR_S3_PRESIGN_SECONDS = 600
    s3 = storage.client()
    s3.create_bucket(Bucket=BUCKET)
    yield s3
    for obj in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        s3.delete_object(Bucket=BUCKET, Key=obj["Key"])
    s3.delete_bucket(Bucket=BUCKET)


def artifact_dir(root, name="job", big=False):
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (path / "README.md").write_text("# card\n")
    (path / "model.safetensors").write_bytes(bytes(range(256)) * (40_000 if big else 4))
    return path


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_a_finished_artifact_becomes_one_complete_object_and_leaves_the_worker(bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "PART_BYTES", 5 * 1024 * 1024)  # 10 MB artifact: three parts
    local = artifact_dir(tmp_path, big=True)
    results = storage.commit_artifact("j1", local, {"artifact": {"bytes": 1}})
    store = results["artifact"]["store"]
    assert store == {"kind": "s3", "bucket": BUCKET, "key": "artifacts/j1.tar", "tar_bytes": store["tar_bytes"]}
    assert not local.exists()  # the worker's copy is gone only after the upload completed
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert keys == ["artifacts/j1.tar"]
    files = members(bucket.get_object(Bucket=BUCKET, Key="artifacts/j1.tar")["Body"].read())
    assert files["compressor-j1/model.safetensors"] == bytes(range(256)) * 40_000
    assert set(files) == {"compressor-j1/config.json", "compressor-j1/README.md", "compressor-j1/model.safetensors"}


def test_a_failed_upload_leaves_no_object_and_no_pending_parts(bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "PART_BYTES", 5 * 1024 * 1024)

    def breaks_midway():
        yield b"x" * (6 * 1024 * 1024)  # one part goes up...
        raise OSError("disk read error")  # ...then the source fails

    with pytest.raises(OSError):
        storage.upload_stream(storage.configured_store(), "artifacts/broken.tar", breaks_midway())
    assert bucket.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0
    assert not bucket.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


@pytest.mark.django_db
def test_downloads_redirect_to_a_presigned_url_that_serves_the_tar(bucket, client, owner, tmp_path):
    results = storage.commit_artifact("j2", artifact_dir(tmp_path), {"artifact": {}, "model_card": "# c"})
    job = make_job(owner, status=Status.SUCCEEDED, artifact_dir="j2", results=results)
    client.login(username=owner.username, password=PASSWORD)
    page = client.get(f"/jobs/{job.id}/").content.decode()
    assert f'href="/jobs/{job.id}/artifact.tar"' in page  # offered although no local directory exists
    response = client.get(f"/jobs/{job.id}/artifact.tar")
    assert response.status_code == 302 and "X-Amz-Signature=" in response["Location"]
    fetched = requests.get(response["Location"], timeout=30)
    assert fetched.status_code == 200
    assert members(fetched.content)["compressor-j2/README.md"] == b"# card\n"


@pytest.mark.django_db
def test_without_presigning_the_web_server_streams_the_object(bucket, settings, client, owner, tmp_path):
    settings.COMPRESSOR_S3_PRESIGN_SECONDS = 0
    results = storage.commit_artifact("j3", artifact_dir(tmp_path), {"artifact": {}})
    job = make_job(owner, status=Status.SUCCEEDED, artifact_dir="j3", results=results)
    client.login(username=owner.username, password=PASSWORD)
    response = client.get(f"/jobs/{job.id}/artifact.tar")
    assert response.status_code == 200
    assert members(b"".join(response.streaming_content))["compressor-j3/config.json"].startswith(b"{")


def test_the_local_store_is_the_default_and_does_nothing(settings, tmp_path):
    settings.COMPRESSOR_ARTIFACT_STORE = "local"
    local = artifact_dir(tmp_path)
    assert storage.commit_artifact("j", local, {"artifact": {}}) == {"artifact": {}}
    assert local.is_dir()
    storage.check_store()  # nothing to reach


def test_an_unreachable_object_store_at_start_up_names_the_setting(settings, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    settings.COMPRESSOR_ARTIFACT_STORE = "s3://nowhere"
    settings.COMPRESSOR_S3_ENDPOINT_URL = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ImproperlyConfigured) as caught:
        storage.check_store()
    assert "COMPRESSOR_ARTIFACT_STORE" in str(caught.value) and "COMPRESSOR_S3_ENDPOINT_URL" in str(caught.value)
    settings.COMPRESSOR_ARTIFACT_STORE = "ftp://x"
    with pytest.raises(ImproperlyConfigured, match="COMPRESSOR_ARTIFACT_STORE must be"):
        storage.check_store()


def test_a_missing_bucket_at_start_up_names_the_setting(s3_server, settings, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    settings.COMPRESSOR_ARTIFACT_STORE = "s3://no-such-bucket"
    settings.COMPRESSOR_S3_ENDPOINT_URL = s3_server
    with pytest.raises(ImproperlyConfigured) as caught:
        storage.check_store()
    assert "refused access to the bucket" in str(caught.value) and "COMPRESSOR_ARTIFACT_STORE" in str(caught.value)


@pytest.mark.django_db
def test_a_job_stored_in_the_bucket_can_be_pushed_to_the_hub(bucket, settings, owner, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from jobs.hub_push import push_job
    from tests.fake_hub import FakeHub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    settings.VAR_DIR = tmp_path / "var"
    hub = FakeHub().start()
    try:
        hub.tokens["hf_writeTokenOfAlice1234"] = ("alice", [], "write")
        settings.COMPRESSOR_HF_ENDPOINT = hub.url
        results = storage.commit_artifact("j4", artifact_dir(tmp_path), {"artifact": {}})
        job = make_job(owner, status=Status.SUCCEEDED, artifact_dir="j4", results=results)
        result = push_job(job, repo_id="alice/from-bucket", token="hf_writeTokenOfAlice1234", owner=owner)
        assert result.files == 3
        assert hub.repos["alice/from-bucket"]["files"]["README.md"] == b"# card\n"
    finally:
        hub.stop()


def test_a_web_server_with_an_unreachable_store_does_not_start(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "COMPRESSOR_ARTIFACT_STORE": "s3://nowhere", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "COMPRESSOR_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
           "COMPRESSOR_WARM_DEMO_CONFIG": "0", "COMPRESSOR_VAR_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "manage.py", "runserver", f"127.0.0.1:{free_port()}", "--noreload"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ImproperlyConfigured: cannot reach the object store s3://nowhere" in proc.stderr
    assert "COMPRESSOR_ARTIFACT_STORE" in proc.stderr and "COMPRESSOR_S3_ENDPOINT_URL" in proc.stderr

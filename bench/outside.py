"""Costs of the 'outside this machine' features; writes bench/results/outside.json.

    nice -n 10 .venv/bin/python bench/outside.py [--mb 256]

* lm-eval task-name check at submission (compression.data_sources.known_lm_eval_task): the quick scan
  of lm-eval's task YAML files vs lm-eval's own full index (TaskManager), first call in a process.
* Artifact upload to an S3-compatible server (jobs.storage.upload_stream, tar streamed straight into a
  multipart upload) against moto's server mode on this machine, for a synthetic artifact of --mb MB;
  and the same tar stream written to /dev/null (the local cost without any store).
moto keeps objects in memory in a Python process: its numbers bound our side's overhead, they are not
what a real S3 or MinIO delivers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "compressor_ui.settings")


def task_name_check() -> dict:
    from compression import data_sources

    t0 = time.perf_counter()
    hit = data_sources.known_lm_eval_task("hellaswag")
    scan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = data_sources._indexed_task_names()
    index_s = time.perf_counter() - t0
    return {"scan_first_call_s": round(scan_s, 2), "scan_names": len(data_sources._scanned_task_names()),
            "full_index_s": round(index_s, 2), "indexed_tasks": len(full), "hellaswag_known": hit}


def s3_upload(mb: int) -> dict:
    import django

    django.setup()
    from django.conf import settings
    from moto.server import ThreadedMotoServer

    from jobs import storage
    from jobs.archive import stream_tar
    from tests.conftest import free_port

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        settings.COMPRESSOR_ARTIFACT_STORE = "s3://bench"
        settings.COMPRESSOR_S3_ENDPOINT_URL = f"http://127.0.0.1:{port}"
        storage.client().create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            art = Path(tmp) / "artifact"
            art.mkdir()
            for i in range(4):
                (art / f"model-{i}.safetensors").write_bytes(os.urandom(mb * 1024 * 1024 // 4))
            t0 = time.perf_counter()
            local = sum(len(c) for c in stream_tar(art, "a"))
            local_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            sent = storage.upload_stream(storage.configured_store(), "a.tar", stream_tar(art, "a"))
            upload_s = time.perf_counter() - t0
        assert sent == local
        return {"artifact_mb": mb, "tar_stream_s": round(local_s, 2), "tar_stream_mb_s": round(mb / local_s, 1),
                "upload_s": round(upload_s, 2), "upload_mb_s": round(mb / upload_s, 1),
                "parts": -(-sent // storage.PART_BYTES)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(),
              "command": " ".join(["python", "bench/outside.py", *sys.argv[1:]]),
              "task_names": task_name_check(), "s3": s3_upload(args.mb)}
    out = ROOT / "bench" / "results" / "outside.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""A full disk and exhausted memory, made real on a real worker: the job fails with that reason,
says what to do, and the artifact root keeps nothing of it.

- Disk full: the artifact root is a 4 MiB tmpfs (needs root to mount; skipped otherwise), far
  smaller than the checkpoint the job exports.
- Out of memory: the worker's pool process gets an address-space limit (`prlimit`) a little above
  what it already uses, so loading a ~0.5 GB model fails inside torch / safetensors.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from jobs.models import JobEvent, Status
from jobs.tasks import enqueue
from tests.jobs.factories import make_job
from tests.tiny import save_tiny_llama

from .test_job_on_worker import wait_until_finished

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


@pytest.fixture
def small_artifact_disk(job_env):
    root: Path = job_env["artifacts"]
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_a_full_disk_fails_the_job_as_disk_full_and_keeps_nothing(owner, job_env, small_artifact_disk,
                                                                  celery_worker):
    model_dir = save_tiny_llama(job_env["models"] / "tiny-llama")  # ~26 MB of fp32 weights, disk is 4 MiB
    job = make_job(owner, model_source=str(model_dir))
    enqueue(job)
    job = wait_until_finished(job, celery_worker, timeout=180)
    assert job.status == Status.FAILED, celery_worker.tail()
    assert job.error_type == "DiskFull", (job.error_type, job.error_message)
    assert "during export" in job.error_message and "free space" in job.error_message
    assert list(small_artifact_disk.iterdir()) == []  # the temporary checkpoint directory is gone
    assert JobEvent.objects.filter(job=job, level="error").exists()


def pool_children(worker) -> list[int]:
    path = Path(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children")
    return [int(pid) for pid in path.read_text().split()]


def vm_size_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize for {pid}")


def test_running_out_of_memory_fails_the_job_as_out_of_memory(owner, job_env, celery_worker):
    if not shutil.which("prlimit"):
        pytest.skip("prlimit (util-linux) is not installed")
    # ~0.45 GB of fp32 weights: far more than the headroom the pool process is left with
    model_dir = save_tiny_llama(job_env["models"] / "bigger", hidden=1024, intermediate=4096, layers=4, heads=8)
    (child,) = pool_children(celery_worker)
    limit = vm_size_bytes(child) + 160 * 2**20
    subprocess.run(["prlimit", f"--pid={child}", f"--as={limit}"], check=True)
    job = make_job(owner, model_source=str(model_dir))
    enqueue(job)
    job = wait_until_finished(job, celery_worker, timeout=180)
    assert job.status == Status.FAILED, celery_worker.tail()
    assert job.error_type == "OutOfMemory", (job.error_type, job.error_message, celery_worker.tail())
    assert job.error_message.startswith("out of memory during ")
    assert "more memory" in job.error_message
    assert list(job_env["artifacts"].iterdir()) == []

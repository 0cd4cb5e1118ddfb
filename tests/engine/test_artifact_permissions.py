"""Artifact files get deliberate permissions whatever the process umask and whatever safetensors
does (it writes 0600): files 0640 and folders 0750, for a web server reading through a shared group."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from compression.model_io.export import ARTIFACT_DIR_MODE, ARTIFACT_FILE_MODE, apply_artifact_modes
from tests.tiny import save_tiny_llama


@pytest.fixture
def strict_umask():
    old = os.umask(0o077)
    yield
    os.umask(old)


def modes(root) -> dict[str, int]:
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def test_a_finished_job_leaves_group_readable_files_and_folders(tmp_path, strict_umask):
    from django.conf import settings

    from compression.pipeline import run_job
    from compression.recipe import Recipe

    models = tmp_path / "models"
    model_dir = save_tiny_llama(models / "tiny")
    spec = {"job_id": "t", "model": str(model_dir), "recipe": Recipe.from_preset("FP8_DYNAMIC").to_dict(),
            "allowed_roots": [str(models)], "evaluation": {"tasks": [], "speed": False},
            "data_dir": settings.COMPRESSOR_DATA_DIR, "device": "cpu"}
    torch.manual_seed(0)
    run_job(spec, tmp_path / "out")
    found = modes(tmp_path / "out")
    assert any(n.endswith(".safetensors") for n in found) and "README.md" in found and "config.json" in found
    assert {name: mode for name, mode in found.items() if mode != ARTIFACT_FILE_MODE
            and not (tmp_path / "out" / name).is_dir()} == {}
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == ARTIFACT_DIR_MODE


def test_set_group_id_folders_keep_the_bit_and_symlinks_are_not_followed(tmp_path):
    root = tmp_path / "artifact"
    (root / "sub").mkdir(parents=True)
    os.chmod(root, 0o2770)
    (root / "sub" / "weights.safetensors").write_bytes(b"x")
    os.chmod(root / "sub" / "weights.safetensors", 0o600)
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o600)
    (root / "link").symlink_to(outside)
    apply_artifact_modes(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o2000 | ARTIFACT_DIR_MODE
    assert stat.S_IMODE((root / "sub" / "weights.safetensors").stat().st_mode) == ARTIFACT_FILE_MODE
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600


def test_uploaded_calibration_files_are_group_readable(tmp_path, settings, django_user_model, strict_umask, db):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from jobs.uploads import UPLOAD_DIR_MODE, UPLOAD_FILE_MODE, store_upload

    settings.UPLOAD_ROOT = tmp_path / "uploads"
    owner = django_user_model.objects.create_user("uploader")
    upload = store_upload(owner, SimpleUploadedFile("notes.jsonl", b'{"text": "a calibration sample"}\n'))
    assert stat.S_IMODE(upload.path.stat().st_mode) == UPLOAD_FILE_MODE
    assert stat.S_IMODE(upload.directory.stat().st_mode) == UPLOAD_DIR_MODE

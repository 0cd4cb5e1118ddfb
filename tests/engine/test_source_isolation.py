"""A calibration source or model id never reaches a file outside the places it is allowed to name:
a Hub id is never resolved against the worker's working directory (where another user's uploads may
lie), and no file of an allowed model directory may be a symlink to elsewhere."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compression import calibration as calib_mod
from compression.calibration import classify_source, load_calibration
from compression.errors import CalibrationError
from compression.model_io.loading import ModelSourceError, check_model_source, hub_snapshot, load_config, load_model
from tests.tiny import demo_tokenizer, save_tiny_llama

SECRET = [{"text": f"another user's private ticket {i}: the password is hunter2"} for i in range(4)]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory that holds another user's upload at var/uploads/7/ (as a worker's would)."""
    uploads = tmp_path / "cwd" / "var" / "uploads" / "7"
    uploads.mkdir(parents=True)
    (uploads / "secret.jsonl").write_text("\n".join(json.dumps(r) for r in SECRET))
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path / "cwd"


@pytest.fixture
def offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("source", ["var/uploads", "var/uploads:train"])
def test_a_hub_dataset_id_that_is_a_local_directory_is_refused(workdir, offline, tmp_path, source):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(CalibrationError) as caught:
        load_calibration(source, demo_tokenizer(), samples=2, seqlen=16, data_dir=data_dir)
    assert "names a path on the server" in caught.value.message


def test_the_hub_loader_never_reads_a_local_directory_of_that_name(workdir, offline):
    # even called directly, past the id check: datasets' remote-only hf:// path, offline here
    (workdir / "acme" / "tickets").mkdir(parents=True)
    (workdir / "acme" / "tickets" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in SECRET))
    with pytest.raises(CalibrationError) as caught:
        calib_mod._load_hub_dataset("acme/tickets", "train", 0, 4)
    assert "could not load the Hub dataset 'acme/tickets'" in caught.value.message
    assert "hunter2" not in caught.value.message


@pytest.mark.parametrize("source, message", [
    ("var/uploads/7/secret.jsonl", "no data directory is configured"),  # a file, but relative to the cwd
    ("buckets/acme", "neither a file under the data directory"),
    ("acme/x:train;rm", "neither a file under the data directory"),
    ("acme/../etc", "neither a file under the data directory"),
    ("acme/x\n", "printable"),
])
def test_without_a_data_directory_only_strict_hub_ids_pass(workdir, source, message):
    with pytest.raises(CalibrationError) as caught:
        classify_source(source, None)
    assert message in caught.value.message


def test_data_directory_files_and_hub_ids_are_told_apart(tmp_path, workdir):
    data_dir = tmp_path / "data"
    (data_dir / "calibration").mkdir(parents=True)
    (data_dir / "calibration" / "mine.jsonl").write_text('{"text": "hello"}')
    assert classify_source("calibration/mine.jsonl", data_dir).path == (data_dir / "calibration" / "mine.jsonl")
    hub = classify_source("HuggingFaceH4/ultrachat_200k:train_sft", data_dir)
    assert (hub.kind, hub.repo_id, hub.split) == ("hub", "HuggingFaceH4/ultrachat_200k", "train_sft")
    # a data-directory symlink to a file outside it is refused like '..'
    (data_dir / "calibration" / "link.jsonl").symlink_to(workdir / "var" / "uploads" / "7" / "secret.jsonl")
    with pytest.raises(CalibrationError, match="outside the data directory"):
        classify_source("calibration/link.jsonl", data_dir)


# -- models ---------------------------------------------------------------------------------------
def test_a_hub_model_id_that_is_a_local_directory_is_refused(workdir, tmp_path):
    save_tiny_llama(workdir / "var" / "models")  # ./var/models looks like the Hub id var/models
    with pytest.raises(ModelSourceError, match="names a path on the server"):
        check_model_source("var/models", allowed_roots=[str(tmp_path / "models")])
    with pytest.raises(ModelSourceError, match="names a path on the server"):
        load_config("var/models", allowed_roots=[])


def fake_hub_cache(cache: Path, repo_id: str, commit: str, model_dir: Path) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(model_dir.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_models_come_from_the_hub_cache_never_from_the_working_directory(workdir, tmp_path, offline,
                                                                            monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = fake_hub_cache(cache, "acme/tiny", commit, save_tiny_llama(tmp_path / "published", seed=1))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    assert hub_snapshot("acme/tiny") == snapshot
    loaded = load_model("acme/tiny")
    assert loaded.identity == {"name": "acme/tiny", "revision": commit, "fingerprint": commit}
    assert load_config("acme/tiny").hidden_size == loaded.model.config.hidden_size

    # a directory of the same name in the working directory is not what the Hub path reads
    save_tiny_llama(workdir / "acme" / "tiny", seed=2, hidden=64)
    assert hub_snapshot("acme/tiny") == snapshot


def test_a_file_symlinked_out_of_an_allowed_model_directory_is_refused(tmp_path):
    root = tmp_path / "models"
    model = save_tiny_llama(root / "tiny")
    outside = tmp_path / "elsewhere.safetensors"
    (model / "model.safetensors").rename(outside)
    (model / "model.safetensors").symlink_to(outside)
    with pytest.raises(ModelSourceError) as caught:
        check_model_source(str(model), allowed_roots=[str(root)])
    assert "model.safetensors is a symlink" in caught.value.message and "outside the allowed" in caught.value.message
    with pytest.raises(ModelSourceError):  # the worker's loader checks again before opening anything
        load_model(str(model), allowed_roots=[str(root)])


def test_symlinks_that_stay_inside_the_allowed_roots_are_fine(tmp_path):
    root = tmp_path / "models"
    model = save_tiny_llama(root / "tiny")
    shared = root / "shared-weights.safetensors"
    (model / "model.safetensors").rename(shared)
    (model / "model.safetensors").symlink_to(shared)
    assert check_model_source(str(model), allowed_roots=[str(root)]).kind == "local"


def test_a_tokenizer_file_symlinked_outside_is_refused_too(tmp_path):
    root = tmp_path / "models"
    model = save_tiny_llama(root / "tiny")
    (tmp_path / "passwd").write_text("root:x:0:0")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(tmp_path / "passwd")
    with pytest.raises(ModelSourceError, match="tokenizer.json is a symlink"):
        check_model_source(str(model), allowed_roots=[str(root)])

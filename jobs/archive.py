"""Stream a directory as an uncompressed tar without holding any file in memory."""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from django.conf import settings

if TYPE_CHECKING:
    from .models import Job

BLOCK = tarfile.BLOCKSIZE  # 512
CHUNK = 1 << 20


def stream_tar(root: Path, arcname: str) -> Iterator[bytes]:
    """Yield a POSIX tar of every regular file under `root`, entries prefixed with `arcname/`.

    Symlinks and special files are skipped, so nothing outside `root` can leak into the archive.
    """
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        stat = path.stat()
        info = tarfile.TarInfo(f"{arcname}/{path.relative_to(root).as_posix()}")
        info.size = stat.st_size
        info.mtime = int(stat.st_mtime)
        info.mode = 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        sent = 0
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                sent += len(chunk)
                yield chunk
        if sent != info.size:
            raise OSError(f"{path} changed size while it was being archived")
        if remainder := info.size % BLOCK:
            yield b"\0" * (BLOCK - remainder)
    yield b"\0" * (2 * BLOCK)


def tar_size(root: Path, arcname: str) -> int:
    """The exact byte length stream_tar will produce (for Content-Length)."""
    return sum(len(part) if not isinstance(part, int) else part for part in _sizes(root, arcname))


def _sizes(root: Path, arcname: str) -> Iterator[int]:
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        info = tarfile.TarInfo(f"{arcname}/{path.relative_to(root).as_posix()}")
        info.size = path.stat().st_size
        yield len(info.tobuf(format=tarfile.PAX_FORMAT))
        yield info.size + (-info.size % BLOCK)
    yield 2 * BLOCK


def artifact_path(job: "Job") -> Path | None:
    """The job's artifact directory, only if it succeeded and the directory is inside ARTIFACT_ROOT."""
    if job.status != "succeeded" or not job.artifact_dir:
        return None
    root = Path(settings.ARTIFACT_ROOT).resolve()
    path = (root / job.artifact_dir).resolve()
    if root not in path.parents or not path.is_dir():
        return None
    return path

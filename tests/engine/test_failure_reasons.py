"""describe_failure: a full disk and exhausted memory are named as such, whatever raised them."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from compression.errors import CalibrationError, describe_failure


def raised_from(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as exc:
            raise outer from exc
    except Exception as exc:
        return exc


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/artifacts/.tmp-1/model.safetensors"),
    OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
    # safetensors reports I/O errors as its own exception type carrying the OS text
    RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                 'message: "No space left on device" })'),
    raised_from(RuntimeError("export failed"), OSError(errno.ENOSPC, "No space left on device")),
])
def test_a_full_disk_is_named_with_what_to_do(exc):
    kind, message = describe_failure(exc, "export")
    assert kind == "DiskFull"
    assert message.startswith("the disk is full during export") and "free space" in message


def test_the_path_being_written_is_named():
    _, message = describe_failure(OSError(errno.ENOSPC, "No space left on device", "/a/b.safetensors"), "export")
    assert "(writing /a/b.safetensors)" in message


@pytest.mark.parametrize("exc", [
    MemoryError(),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)"),
    OSError(errno.ENOMEM, os.strerror(errno.ENOMEM)),
    raised_from(ValueError("while loading layer 3"), MemoryError()),
])
def test_exhausted_memory_is_named_with_what_to_do(exc):
    kind, message = describe_failure(exc, "load")
    assert kind == "OutOfMemory"
    assert message.startswith("out of memory during load: ") and "more memory" in message


def test_other_failures_keep_their_own_type_and_message():
    assert describe_failure(CalibrationError("no usable text"), "calibration") == (
        "CalibrationError", "calibration.source: no usable text")
    assert describe_failure(ValueError("out of range"), None) == ("ValueError", "out of range")
    # "memory" alone is not an allocation failure
    assert describe_failure(RuntimeError("memory layout is not contiguous"))[0] == "RuntimeError"
    assert describe_failure(KeyError())[1] == "KeyError()"

"""Exceptions the engine raises; kept free of heavy imports so the UI can import them cheaply."""
from __future__ import annotations


class RecipeError(ValueError):
    """A recipe (or a recipe/model combination) that cannot be run.

    ``field`` is a dotted path to the offending value (``stages[0].modifiers[1].group_size``,
    ``recipe.group_size`` or a form field name); ``message`` says what is allowed instead.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class JobCancelled(Exception):
    """Raised between decoder layers when ``should_stop()`` returned true."""


class UnsupportedModelError(ValueError):
    """The model's structure cannot be walked one decoder layer at a time."""


class SparsityPatternError(RuntimeError):
    """A 2:4 weight lost its pattern after a compression stage (a bug, never silently ignored)."""


class CalibrationError(RecipeError):
    """Calibration data could not be found, read or tokenized (field defaults to calibration.source)."""

    def __init__(self, message: str, field: str = "calibration.source"):
        super().__init__(field, message)


DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT
NO_MEMORY_ERRNO = 12  # ENOMEM
DISK_FULL_TEXT = ("no space left on device", "storagefull", "disk quota exceeded")
NO_MEMORY_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe_failure(exc: BaseException, stage: str | None = None) -> tuple[str, str]:
    """(error type, message for the user) of a job that raised ``exc`` in ``stage``.

    A full disk and an exhausted memory get their own types and say what to do, whatever layer
    raised them (an OSError, safetensors' or torch's RuntimeError, a CUDA OutOfMemoryError, in the
    exception itself or in its chain); everything else keeps its own class name and message.
    """
    where = f" during {stage}" if stage else ""
    for link in _chain(exc):
        text = str(link).lower()
        if (isinstance(link, OSError) and link.errno in DISK_FULL_ERRNOS) or any(t in text for t in DISK_FULL_TEXT):
            path = getattr(link, "filename", None)
            return "DiskFull", (f"the disk is full{where}" + (f" (writing {path})" if path else "")
                                + f": {str(link).strip()[:300]}. Nothing of the job was kept; free space "
                                "under the artifact directory and resubmit.")
        if isinstance(link, MemoryError) or (isinstance(link, OSError) and link.errno == NO_MEMORY_ERRNO) \
                or (isinstance(link, RuntimeError) and any(t in text for t in NO_MEMORY_TEXT)):
            first = str(link).strip().splitlines()[0][:300] if str(link).strip() else type(link).__name__
            return "OutOfMemory", (f"out of memory{where}: {first}. Try fewer or shorter calibration samples, a "
                                   "smaller evaluation batch, or a worker with more memory.")
    return type(exc).__name__, str(exc) or repr(exc)

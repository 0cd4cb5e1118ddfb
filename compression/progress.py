"""Progress events of a job: each stage's share of the progress bar, and its wall time.

Stages and their share of the progress bar:
    load 0-5%, baseline evaluation 5-20%, calibration data 20-25%, compression 25-75%
    (one decoder layer at a time), export 75-80%, compressed evaluation 80-97%, finish 97-100%.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

Progress = Callable[[dict], None]

STAGES = {  # stage -> (start, end) fraction of the whole job
    "load": (0.0, 0.05),
    "baseline": (0.05, 0.20),
    "calibration": (0.20, 0.25),
    "compress": (0.25, 0.75),
    "finetune": (0.40, 0.70),  # a recipe with a fine-tune stage: prune 25-40%, fine-tune, quantize 70-75%
    "export": (0.75, 0.80),
    "evaluate": (0.80, 0.97),
    "finish": (0.97, 1.0),
}


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall time of the block under ``timings[key]`` (seconds)."""
    t0 = time.monotonic()
    try:
        yield
    finally:
        timings[key] = time.monotonic() - t0


class Stage:
    """Emits progress events with the job-wide fraction for one stage."""

    def __init__(self, progress: Progress, stage: str):
        self.progress, self.stage = progress, stage
        self.start, self.end = STAGES[stage]

    def __call__(self, message: str, within: float = 0.0, **extra: Any) -> None:
        within = min(max(within, 0.0), 1.0)
        fraction = self.start + (self.end - self.start) * within
        self.progress({"stage": self.stage, "fraction": round(fraction, 4), "within": round(within, 4),
                       "message": message, **extra})


def engine_progress(progress: Progress, lo: float = 0.0, hi: float = 1.0) -> Progress:
    """Map the engine's per-layer events into the compress stage's share of the bar (its ``lo``-``hi`` part)."""
    stage = Stage(progress, "compress")

    def forward(event: dict) -> None:
        layers = max(int(event.get("layers") or 1), 1)
        layer = int(event.get("layer") or 0)
        done = layer + (1 if "module" not in event else 0.5)
        extra = {k: v for k, v in event.items() if k not in ("stage", "message", "fraction")}
        stage(event.get("message") or f"layer {layer + 1}/{layers}", lo + (hi - lo) * done / layers, **extra)

    return forward

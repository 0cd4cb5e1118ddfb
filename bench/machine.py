"""One description of the machine a benchmark ran on, with the load it was under (results depend on it)."""
from __future__ import annotations

import os
import platform


def machine() -> str:
    """E.g. '2-core CPU, 23 GB (x86_64), load average 0.4 at the start' — the load measured, never assumed."""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GB"
    except ImportError:
        mem = ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    busy = f", load average {load:.1f} when the result was written" if load is not None else ""
    return f"{os.cpu_count()}-core CPU{mem} ({platform.machine()}){busy}"

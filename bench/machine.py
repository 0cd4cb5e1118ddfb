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


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it was exec'd: /proc/self/status VmHWM.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux a child inherits its parent's peak across
    fork + exec (measured: a child of a 1.5 GB parent reports 1.5 GB from ru_maxrss, 13 MB from
    VmHWM), so a benchmark child started by a parent that held a model would report the parent's."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

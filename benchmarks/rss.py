"""A benchmark child's own peak RSS, for the runner's table.

The runner's ``wait4`` reports ``ru_maxrss``, which on Linux also counts the
parent's resident set at the spawn (the child execs from the parent's memory,
and the kernel keeps the larger high-water mark across ``exec``): a 40 MB
crawler spawned by a 500 MB runner reads as 500 MB. ``VmHWM`` is reset by
``exec``, so each child reads its own at the end of its run.
"""

from __future__ import annotations

__all__ = ["peak_rss_mb"]


def peak_rss_mb() -> float | None:
    """This process's peak resident set size since its ``exec``, in MiB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None

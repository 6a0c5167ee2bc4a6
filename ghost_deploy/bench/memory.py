"""Host memory of this process: current RSS and peak RSS, with the peak reset between backends on Linux.

Peak RSS is a property of the whole process, not of one backend. On Linux, writing `5` to
/proc/self/clear_refs resets the peak (VmHWM) to the current RSS, so the peak read after one backend's
load and warm-up is that phase's own high-water mark (still counting memory the backends loaded
before it keep). Without that file (macOS, locked-down containers) the peak is `ru_maxrss`, the
process-wide maximum since start, and only grows: the report then says `process_lifetime`.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the process peak RSS to the current RSS; False where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> tuple[int, str]:
    """(peak RSS in bytes, method): `vmhwm` (resettable, Linux) or `ru_maxrss` (process lifetime)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024, "vmhwm"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (maxrss if sys.platform == "darwin" else maxrss * 1024), "ru_maxrss"


class PeakWindow:
    """Context manager: the peak RSS reached inside the block (see module docstring for the caveats)."""

    def __enter__(self):
        self.reset = reset_peak_rss()
        self.rss_before = current_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        self.peak, method = peak_rss_bytes()
        self.method = method if self.reset else "process_lifetime"

    def to_dict(self) -> dict:
        mb = lambda value: None if value is None else round(value / 1e6, 2)  # noqa: E731
        delta = None if self.rss_before is None or not self.reset else self.peak - self.rss_before
        return {"rss_before_mb": mb(self.rss_before), "peak_rss_mb": mb(self.peak), "peak_delta_mb": mb(delta),
                "peak_method": self.method}

"""Peak memory probes: process RSS (sampled in a background thread) and CUDA allocator peak."""

from __future__ import annotations

import resource
import threading
import time

import psutil
import torch


class PeakMemory:
    """Context manager measuring peak RSS (MB) and peak CUDA allocation (MB) inside the ``with`` block.

    Example:
        >>> with PeakMemory() as mem:
        ...     x = bytearray(10_000_000)
        >>> mem.peak_rss_mb > 0
        True
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_rss_mb = 0.0
        self.peak_device_mb: float | None = None
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss_mb = max(self.peak_rss_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start_rss_mb = self._proc.memory_info().rss / 2**20
        self.peak_rss_mb = self.start_rss_mb
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._t0
        self.peak_rss_mb = max(self.peak_rss_mb, self._proc.memory_info().rss / 2**20)
        if torch.cuda.is_available():
            self.peak_device_mb = torch.cuda.max_memory_allocated() / 2**20


def lifetime_peak_rss_mb() -> float:
    """Peak RSS of this process since it started, in MB.

    Reads ``VmHWM`` from ``/proc/self/status`` (the high-water mark of this process's own address space).
    ``ru_maxrss`` is only the fallback: on Linux it survives fork+exec, so a child process started by a large
    parent reports at least the parent's RSS.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

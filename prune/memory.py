"""Wall time and peak memory per pipeline stage.

On CUDA the peak is torch.cuda.max_memory_allocated, reset at each stage start. On CPU it is the
process's peak resident set (VmHWM), reset per stage by writing 5 to /proc/self/clear_refs; where
that reset is refused, the stage reports the process-lifetime peak and says so.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status in bytes: VmHWM (peak resident set), VmRSS (current)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def mem_available_bytes() -> int:
    """MemAvailable of /proc/meminfo in bytes: what the machine can still give a process without swapping."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def _read_hwm() -> int:
    return proc_status_bytes("VmHWM")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StageMeter:
    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.time_s: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self.peak_is_lifetime: set[str] = set()

    @contextmanager
    def stage(self, name: str, detail: str = ""):
        """Time and peak memory of the block; logs a line as the stage starts ("stage <name>: <detail>")."""
        log.info("stage %s%s", name, f": {detail}" if detail else "")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif not _reset_hwm():
            self.peak_is_lifetime.add(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.time_s[name] = self.time_s.get(name, 0.0) + time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() if self.cuda else _read_hwm()
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak)

    def as_dict(self) -> dict:
        return {"time_s": dict(self.time_s), "peak_memory_bytes": dict(self.peak_bytes),
                "peak_memory_kind": "cuda_max_allocated" if self.cuda else "process_peak_rss",
                **({"peak_memory_lifetime_stages": sorted(self.peak_is_lifetime)} if self.peak_is_lifetime else {})}

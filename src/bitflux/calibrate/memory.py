"""Peak memory of a stretch of work: the device allocator's peak on CUDA, sampled resident memory on CPU."""

from __future__ import annotations

import resource
import threading

import torch

_PAGE = 4096


def resident_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def peak_resident_bytes() -> int:
    """The largest resident set size of this process so far: Linux's VmHWM, the peak of this process's own
    memory. (getrusage's ru_maxrss is not: a child started by exec inherits its parent's peak there, so a
    small child of a large parent reports the parent's figure.) ru_maxrss where /proc is missing."""
    kilobytes = _read_number("/proc/self/status", "VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes * 1024


def available_memory(device) -> int:
    """Bytes free for new tensors: the GPU's free memory, or the system's available memory (Linux
    MemAvailable, within this process's cgroup limit: a container's; 0 where unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _read_number("/proc/meminfo", "MemAvailable:") * 1024
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                            "memory/memory.usage_in_bytes")):  # cgroup v2, v1
        cap, used = _read_number(f"/sys/fs/cgroup/{limit}"), _read_number(f"/sys/fs/cgroup/{usage}")
        if cap and used:
            available = min(available, max(cap - used, 0))
    return available


def release_cached_memory(device) -> None:
    """Memory freed but kept for reuse handed back, so that available_memory counts it: garbage in reference
    cycles, the CUDA allocator's cache, glibc's heap."""
    import gc

    from ..pipeline import trim_heap

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    trim_heap()


def _read_number(path: str, label: str = "") -> int:
    """The number after `label` on its line of a /proc or /sys file (the file's first number without one);
    0 if absent or not a number ("max": no limit)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(label):
                    return int(line[len(label):].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def reset_peak_resident() -> bool:
    """Start peak_resident_bytes afresh from the present resident size (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """`with PeakMemory(device) as peak:` ... then peak.host_bytes (largest RSS seen, sampled every
    `interval` s, so brief spikes can be missed), peak.host_start_bytes, and peak.device_bytes on CUDA."""

    def __init__(self, device="cpu", interval: float = 0.02):
        self.device = torch.device(device)
        self.interval = interval
        self.host_bytes = self.host_start_bytes = self.device_bytes = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.host_bytes = max(self.host_bytes, resident_bytes())

    def __enter__(self):
        self.host_start_bytes = self.host_bytes = resident_bytes()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.host_bytes = max(self.host_bytes, resident_bytes())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_bytes = torch.cuda.max_memory_allocated(self.device)
        return False

"""Give back the resident pages of weights that were read straight from a safetensors file.

`from_pretrained` memory-maps safetensors files: a weight's storage is a view of the file's mapping, and the mapping
stays alive while any tensor of the file does. Slicing replaces a weight with a new, smaller tensor, but the old
weight's file pages stay resident (counted in the process's RSS) until the whole file is unmapped, so slicing peaked
at the dense weights plus every sliced copy. `release(tensor)` drops the pages of a tensor that is being discarded
(madvise MADV_DONTNEED on the whole pages inside it), which is safe only for file-backed, copy-on-write mappings: the
range belongs to that tensor alone, and a later read would re-read the file. Anonymous (heap) memory is never
touched. Linux only; elsewhere, and for CUDA tensors, this does nothing.
"""
from __future__ import annotations

import ctypes
import mmap
import os

import torch

MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private mappings of regular files (the safetensors weights among them)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and parts[1].endswith("p") and parts[4] != "0":
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def release(tensors: list[torch.Tensor], mappings: list[tuple[int, int]] | None = None) -> int:
    """Drop the resident file pages of `tensors` (about to be discarded); returns the bytes released."""
    if _libc is None:
        return 0
    mappings = file_mappings() if mappings is None else mappings
    page, released = mmap.PAGESIZE, 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(a <= start and end <= b for a, b in mappings):
            continue
        lo, hi = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if hi > lo and _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) == 0:
            released += hi - lo
    return released

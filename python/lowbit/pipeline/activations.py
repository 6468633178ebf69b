"""The hidden states that flow between decoder layers during calibration (samples x tokens x
hidden, three sets at once: a layer's inputs, its float outputs and its quantized outputs):
kept in memory as computed, in bf16, or spilled to a file on disk."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from typing import List, Optional

import torch

MODES = ("auto", "memory", "bf16", "disk")
# activations="auto" spills to disk when the three sets would take more than this fraction of
# the memory the system reports available.
MEMORY_FRACTION = 0.5
# Sets of hidden states alive at once: a layer's inputs, its float outputs, its quantized outputs.
SETS_ALIVE = 3


def available_memory() -> int:
    """Bytes the system reports available (Linux MemAvailable; else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_activations(mode, spill_dir) -> None:
    """ValueError for an activations mode or spill_dir oneshot cannot use."""
    if mode not in MODES:
        raise ValueError(f"activations must be one of {MODES}, got {mode!r}")
    if spill_dir is not None and not os.path.isdir(spill_dir):
        raise ValueError(f"spill_dir {spill_dir!r} is not a directory: pass an existing directory on a disk with room "
                         "for the calibration activations")


def resolve_mode(mode: str, nbytes: List[int], spill_dir: Optional[str]) -> str:
    """The storage for first-layer inputs of nbytes[i] bytes for sample i: `mode` as given, or
    for "auto" "disk" when the sets alive at once exceed MEMORY_FRACTION of available memory,
    else "memory". "disk" checks up front that spill_dir (default: the system's temporary
    directory) has room."""
    check_activations(mode, spill_dir)
    need = SETS_ALIVE * sum(nbytes)
    if mode == "auto":
        mode = "disk" if need > MEMORY_FRACTION * available_memory() else "memory"
    if mode == "disk":
        directory = spill_dir or tempfile.gettempdir()
        free = shutil.disk_usage(directory).free
        if free < need:
            raise ValueError(f"spilling the calibration activations needs {need / 2**30:.2f} GiB on disk, but "
                             f"{directory!r} has {free / 2**30:.2f} GiB free: pass spill_dir= on a larger disk, or "
                             "fewer / shorter calibration samples (num_calibration_samples, max_seq_length)")
    return mode


class ActivationStore:
    """One set of hidden states, a tensor of nbytes[i] bytes for calibration sample i (a decoder
    layer's outputs are shaped as its inputs), read back in the dtype it was stored from.
    "memory" keeps the tensors themselves; "bf16" keeps bf16 copies (half of fp32's memory;
    results then differ from fp32 by the bf16 rounding of the layers' inputs); "disk" writes them
    to one file in spill_dir (deleted by close()) and reads a sample back when it is used, so only
    the samples in use take memory, and the results equal the in-memory ones."""

    def __init__(self, mode: str, nbytes: List[int], spill_dir: Optional[str] = None):
        if mode not in MODES[1:]:
            raise ValueError(f"an ActivationStore holds 'memory', 'bf16' or 'disk' activations, got {mode!r}")
        self.mode, self.spill_dir = mode, spill_dir
        self._sizes = list(nbytes)
        self._items: List[Optional[torch.Tensor]] = [None] * len(nbytes)  # on disk: empty tensors of the shape
        self._dtypes: List[Optional[torch.dtype]] = [None] * len(nbytes)
        self._offsets = [0, *itertools.accumulate(self._sizes)][:-1]
        self._fd: Optional[int] = None
        self._file: Optional[str] = None
        if mode == "disk":
            self._fd, self._file = tempfile.mkstemp(prefix="lowbit-activations-", suffix=".bin", dir=spill_dir)

    def like(self) -> "ActivationStore":
        """An empty store of the same kind and sizes (a layer's outputs)."""
        return ActivationStore(self.mode, self._sizes, self.spill_dir)

    def __len__(self) -> int:
        return len(self._items)

    def put(self, index: int, hidden: torch.Tensor) -> None:
        nbytes = hidden.numel() * hidden.element_size()
        if nbytes != self._sizes[index]:
            raise ValueError(f"sample {index}'s hidden states changed size between decoder layers ({nbytes} bytes, "
                             f"first layer {self._sizes[index]}): lowbit calibrates decoder layers that keep the "
                             "hidden states' shape")
        if self.mode == "memory":
            self._items[index] = hidden
        elif self.mode == "bf16":
            self._items[index] = hidden.to(torch.bfloat16) if hidden.is_floating_point() else hidden
        else:
            data = _bytes(hidden.detach().contiguous())
            done = 0
            while done < nbytes:
                done += os.pwrite(self._fd, data[done:], self._offsets[index] + done)
            self._items[index] = torch.empty(hidden.shape, dtype=hidden.dtype, device="meta")
        self._dtypes[index] = hidden.dtype

    def get(self, index: int) -> torch.Tensor:
        item = self._items[index]
        if item is None:
            raise IndexError(f"activation {index} was never stored")
        if self.mode == "disk":
            out = torch.empty(item.shape, dtype=item.dtype)
            data, done = _bytes(out), 0
            while done < len(data):
                got = os.preadv(self._fd, [data[done:]], self._offsets[index] + done)
                if got == 0:
                    raise OSError(f"the spill file {self._file} ended early (was it truncated?)")
                done += got
            return out
        dtype = self._dtypes[index]
        return item if item.dtype == dtype else item.to(dtype)

    def close(self) -> None:
        """Drop the activations (and the spill file)."""
        self._items = [None] * len(self._items)
        if self._fd is not None:
            os.close(self._fd)
            os.unlink(self._file)
            self._fd = self._file = None


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, shared with it."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")

"""Shared timing helper for the benchmarks: warm up, then the fastest of repeated runs (the
machines are shared VMs; the minimum is the statistic least disturbed by other tenants, and
every peer in a table is timed the same way)."""

import functools
import time


def best_time(fn, *, warmup: int = 2, repeat: int = 10, min_seconds: float = 0.3) -> float:
    """Fastest wall time of fn() in seconds; repeats at least `repeat` times and `min_seconds`."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return min(times)


def print_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))


@functools.lru_cache(maxsize=None)
def last_level_cache() -> int:
    """Bytes of the CPU's last-level cache (Linux sysfs; 32 MiB where it cannot be read)."""
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
    return max(sizes, default=32 << 20)


def cold_weights(make, weight_bytes: int, budget: int | None = None):
    """A callable that cycles through enough independent copies (from make(), each a callable
    over its own weights) to span `budget` bytes (default: twice the last-level cache, at least
    128 MiB; some servers have L3s of hundreds of MiB), so every call reads its weights from
    memory as a layer in a whole model does, not from a cache that the previous call warmed."""
    budget = budget or max(128 << 20, 2 * last_level_cache())
    fns = [make() for _ in range(max(1, -(-budget // max(weight_bytes, 1))))]
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call


def read_bandwidth() -> float:
    """GB/s of a streaming read (torch.sum over 1 GiB of fp32): what a memory-bound kernel can reach."""
    import torch

    big = torch.ones(1 << 28)
    return big.numel() * 4 / best_time(lambda: big.sum(), repeat=5) / 1e9


def isa_paths(requested: str | None = None, int8: bool = False) -> list:
    """The lowbit ISA paths to time: a comma list asked for, else LOWBIT_ISA's path alone when it is
    set (scripts/as_cpu.sh sets it with the peers' caps), else every path this CPU supports (the
    avxvnni path only for int8 kernels: every other kernel runs its AVX2 code there)."""
    import os

    import lowbit

    if requested:
        return requested.split(",")
    if os.environ.get("LOWBIT_ISA"):
        return [os.environ["LOWBIT_ISA"]]
    return [isa for isa in lowbit.supported_isas() if int8 or isa != "avxvnni"]


def peer_caps() -> str:
    """The instruction-set caps on the dense peers (scripts/as_cpu.sh), for a table's caption."""
    import os

    caps = [f"{k}={os.environ[k]}" for k in ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
            if os.environ.get(k)]
    return "dense peers capped: " + ", ".join(caps) if caps else "dense peers uncapped (the CPU's best code)"

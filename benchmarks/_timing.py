"""Shared timing helper for the benchmarks: warm up, then the fastest of repeated runs (the
machines are shared VMs; the minimum is the statistic least disturbed by other tenants, and
every peer in a table is timed the same way)."""

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


def cold_weights(make, weight_bytes: int, budget: int = 128 << 20):
    """A callable that cycles through enough independent copies (from make(), each a callable
    over its own weights) to span `budget` bytes, so every call reads its weights from memory
    as a layer in a whole model does, not from a cache that the previous call warmed."""
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

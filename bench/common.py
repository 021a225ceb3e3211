"""Shared benchmark plumbing: a best-of-N timer and result rows that bench/run_all.py collects into BENCHMARKS.md.

Figures are ratios against a baseline timed in the same process, never absolute timings asserted in tests.
"""
from __future__ import annotations

import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T = TypeVar("T")


@dataclass
class Row:
    bench: str
    name: str
    seconds: float
    baseline: str
    baseline_seconds: float
    goal: str = ""

    @property
    def ratio(self) -> float:
        return self.seconds / self.baseline_seconds

    def markdown(self) -> str:
        return (f"| {self.bench} | {self.name} | {self.seconds * 1e3:.1f} ms | {self.baseline} | "
                f"{self.ratio:.2f}x | {self.goal} |")


HEADER = "| benchmark | measured | time | baseline (same run) | ratio | goal |\n|---|---|---|---|---|---|"


def cpu_threads(device: str, n: int = 2) -> None:
    """Every CPU figure uses the same torch thread count (the 2-core CI machine's), whatever the host has."""
    if device == "cpu":
        torch.set_num_threads(n)


def random_vit(name: str, img_size, device: str = "cpu", **overrides):
    """A timm ViT as a FrozenViT with random weights (speed does not depend on their values) on `device`; the
    warning that no pretrained weights were loaded is silenced."""
    from cdam_pl.backbone import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(name, weights=None, img_size=img_size, **overrides).to(device)


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Best-of-`repeat` wall time of fn() in seconds (best-of is the least noisy estimator on a shared machine)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def timed_rounds(fns: dict[str, Callable[[], object]], repeat: int, device: str = "cpu") -> dict[str, list[float]]:
    """Wall times of each function over `repeat` rounds, one call of each per round (in turns), so that a busy spell
    on a shared machine slows a round of every function rather than all calls of one."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(timeit(fn, repeat=1, warmup=0, device=device))
    return times


def counted(fn: Callable[[], T]) -> tuple[T, int]:
    """fn()'s result and the floating-point operations the call took (torch's FlopCounterMode: matmuls,
    convolutions, attention, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


def flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of fn."""
    return counted(fn)[1]


def machine() -> str:
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
            f"{torch.get_num_threads()}{gpu}, torch {torch.__version__}, Python {platform.python_version()}")


def print_rows(rows: list[Row]) -> None:
    print(HEADER)
    for r in rows:
        print(r.markdown())


def main(run: Callable[..., list[Row]], doc: str | None) -> None:
    """The command line every bench module shares: `--quick`, `--device`, then the machine and the table."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rows = run(args.quick, args.device)
    print(machine())
    print_rows(rows)

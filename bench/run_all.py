"""Run every benchmark in bench/, print each figure as a ratio to its same-run baseline, write BENCHMARKS.md.

    python bench/run_all.py [--quick] [--device cpu|cuda] [--out BENCHMARKS.md] [--only NAME ...]
    make bench            # full figures (the ones the README quotes)
    make bench-quick      # under 5 minutes on 2 CPU cores

A benchmark is any module bench/<name>.py with a top-level `run(quick=False, device="cpu") -> list[Row]`
(bench/common.py); a new one joins by existing. Each runs in its own Python process, so memory, thread settings
and imports of one cannot skew the next, and a crash or a hang (`--timeout`) costs only that module's rows.
The output file holds one section per device: `--device cuda` rewrites only the GPU section (titled with the
card's name) and keeps the CPU section, and the other way round.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
NOT_BENCHMARKS = {"run_all", "common", "__init__"}
MARK = "@@bench-row "
TITLE = "# Benchmarks"
PREAMBLE = f"""{TITLE}

Written by `bench/run_all.py` (`make bench`, `make bench-quick`; on a GPU machine `bash bench/gpu_check.sh`).
Every figure is a ratio against a baseline timed in the same run on the same machine: ratio = time / baseline
time, so below 1 is faster than the baseline. `met` compares the ratio with the goal. The README quotes its speed
figures from this file.
"""


def discover() -> list[str]:
    """Names of bench/*.py modules that define a top-level `run` function (read with ast: nothing imported)."""
    names = []
    for path in sorted(BENCH.glob("*.py")):
        if path.stem in NOT_BENCHMARKS:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        if any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body):
            names.append(path.stem)
    return names


def worker(name: str, quick: bool, device: str) -> None:
    """In the child process: run one module and print its rows as marked JSON lines."""
    import importlib

    rows = importlib.import_module(f"bench.{name}").run(quick=quick, device=device)
    for row in rows:
        print(MARK + json.dumps(asdict(row)), flush=True)


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Result(NamedTuple):
    rows: list[dict]
    error: str | None
    wall: float  # seconds
    cpu: float  # seconds of CPU time (user + system) of the module's process and its children


def run_module(name: str, quick: bool, device: str, timeout: float) -> Result:
    """One module run in a fresh interpreter."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--device", device]
    cmd += ["--quick"] if quick else []
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0, c0 = time.perf_counter(), _child_cpu()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result([], f"timed out after {timeout:g} s", time.perf_counter() - t0, _child_cpu() - c0)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - c0
    rows = [json.loads(line[len(MARK):]) for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return Result(rows, tail[-1] if tail else f"exit status {proc.returncode}", wall, cpu)
    return Result(rows, None if rows else "run() returned no rows", wall, cpu)


# --- formatting ---------------------------------------------------------------------------------------------------
def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.4f}x ({1 / r:.0f}x faster)"


def goal_met(ratio: float, goal: str) -> str:
    """'yes' / 'no' for goals of the form '<= 1.25x' or '>= 2x' (anything after is a comment), else ''."""
    m = re.match(r"\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)\s*x", goal or "")
    if not m:
        return ""
    op, bound = m.group(1), float(m.group(2))
    ok = {"<=": ratio <= bound, ">=": ratio >= bound, "<": ratio < bound, ">": ratio > bound}[op]
    return "yes" if ok else "**no**"


HEADER = ("| benchmark | measured | time | baseline (same run) | baseline time | ratio | goal | met |\n"
          "|---|---|---|---|---|---|---|---|")


def table_line(row: dict) -> str:
    ratio = row["seconds"] / row["baseline_seconds"]
    cells = [row["bench"], row["name"], fmt_time(row["seconds"]), row["baseline"], fmt_time(row["baseline_seconds"]),
             fmt_ratio(ratio), row["goal"], goal_met(ratio, row["goal"])]
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def machine_info(device: str) -> str:
    import torch

    from bench.common import machine

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        ram = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        ram = ""
    info = f"{cpu}{ram}; {machine()}"
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        info += f"; CUDA {torch.version.cuda}, {p.name} with {p.total_memory / 2**30:.0f} GiB"
    return info


def section(device: str, body: str) -> str:
    return f"<!-- bench:{device} start -->\n{body.rstrip()}\n<!-- bench:{device} end -->\n"


def read_sections(path: Path) -> dict[str, str]:
    """Device -> body of its section in an existing output file."""
    if not path.is_file():
        return {}
    return {m.group(1): m.group(2) for m in re.finditer(
        r"<!-- bench:(\w+) start -->\n(.*?)<!-- bench:\1 end -->\n?", path.read_text(), re.S)}


def partial_update(old: str, names: list[str], note: str, rows: list[str]) -> str:
    """An `--only` run: the old section with these modules' rows replaced (others kept) and a note appended."""
    lines = old.rstrip("\n").split("\n")
    head = [ln for ln in lines if not ln.startswith("|")]
    while head and head[-1] == "":
        head.pop()
    table = [ln for ln in lines if ln.startswith("|") and ln.split("|")[1].strip() not in names]
    if len(table) < 2:  # no table yet
        table = HEADER.split("\n")
    notes = [ln for ln in head if ln.startswith("- ")]
    intro = [ln for ln in head if not ln.startswith("- ")]
    return "\n".join(intro + notes + [note, ""] + table + rows) + "\n"


def merge(path: Path, device: str, body: str) -> str:
    """The whole file: preamble, then every device's section, this device's replaced by `body`."""
    sections = read_sections(path)
    sections[device] = body
    order = sorted(sections, key=lambda d: (d != "cpu", d))
    return PREAMBLE + "\n" + "\n".join(section(d, sections[d]) for d in order)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short versions of every benchmark (< 5 min on 2 cores)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="markdown file to write (default BENCHMARKS.md; with --quick "
                    "bench/out/BENCHMARKS_quick.md, so the figures the README quotes stay those of a full run); "
                    "its other device's section is kept")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these bench/<NAME>.py modules; their rows "
                    "replace theirs in --out, the other modules' rows are kept")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per module (default 1800, --quick 600)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.quick, args.device)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("run_all: --device cuda but torch sees no CUDA device; run on a GPU machine or use --device cpu",
              file=sys.stderr)
        return 2
    names = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            print(f"run_all: no benchmark named {', '.join(unknown)}; found {', '.join(names)}", file=sys.stderr)
            return 2
        names = [n for n in names if n in args.only]
    skipped = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in NOT_BENCHMARKS and p.stem not in names)
    timeout = args.timeout or (600.0 if args.quick else 1800.0)
    info = machine_info(args.device)
    print(info)
    print(f"benchmarks: {', '.join(names)}" + (f" (not benchmarks here, no run(): {', '.join(skipped)})"
                                               if skipped and not args.only else ""))

    all_rows, failures, walls, cpus = [], [], {}, {}
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    for name in names:
        print(f"\n== {name} ...", flush=True)
        rows, error, walls[name], cpus[name] = run_module(name, args.quick, args.device, timeout)
        all_rows += rows
        if rows:
            print(HEADER)
            print("\n".join(table_line(r) for r in rows))
        if error:
            failures.append((name, error))
            print(f"FAILED: {error}")
        print(f"({name}: {walls[name]:.0f} s wall, {cpus[name]:.0f} s CPU)", flush=True)
    total, load1 = time.perf_counter() - t_start, os.getloadavg()[0]

    argv = ["python", "bench/run_all.py"] + (["--quick"] if args.quick else []) + (
        ["--device", args.device] if args.device != "cpu" else []) + (["--only", *args.only] if args.only else [])
    title = "CPU" if args.device == "cpu" else f"GPU: {torch.cuda.get_device_name(0)}"
    when = (f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; "
            f"wall time {total / 60:.1f} min ({', '.join(f'{n} {w:.0f} s' for n, w in walls.items())}), "
            f"CPU time {sum(cpus.values()) / 60:.1f} min; load average {load0:.1f} at the start, {load1:.1f} at the "
            f"end (other processes on the machine slow every figure, baselines alike)")
    lines = [
        f"## {title}{' (quick)' if args.quick else ''}",
        "",
        f"- Machine: {info}",
        f"- Command: `{shlex.join(argv)}`",
        f"- Date: {when}",
        "",
        HEADER,
        *(table_line(r) for r in all_rows),
    ]
    if failures:
        lines += ["", *(f"- **{n} failed**: {e}" for n, e in failures)]
    out = Path(args.out or (ROOT / "bench" / "out" / "BENCHMARKS_quick.md" if args.quick else ROOT / "BENCHMARKS.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = read_sections(out).get(args.device)
    if args.only and previous and not failures:  # keep the other modules' rows of the last full run
        body = partial_update(previous, names, f"- Rerun of {', '.join(names)}: `{shlex.join(argv)}`, {when}",
                              [table_line(r) for r in all_rows])
        lines = body.rstrip("\n").split("\n")
    from cdam_pl.io import atomic_write_text

    atomic_write_text(out, merge(out, args.device, "\n".join(lines) + "\n"))
    print(f"\nwall time {total / 60:.1f} min, CPU time {sum(cpus.values()) / 60:.1f} min; wrote {out}"
          + (f"; {len(failures)} module(s) failed" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

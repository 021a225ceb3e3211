"""explain.py at scale: peak memory against the number of images (flat: the maps stream to shards on disk) and
images per second on one device and on 1 and 2 CPU processes (`--devices`, Lightning prediction).

    python bench/explain_scale.py                              # both figures, printed
    python bench/explain_scale.py --write BENCHMARKS.md        # and as that file's explain_scale section
    python bench/explain_scale.py --baseline-tree /tmp/old     # memory of another checkout's explain.py beside
    python bench/run_all.py --only explain_scale               # the speed figures as ratios (full run: ViT-S/16)

Memory: `explain.py --no-panels` in a fresh process per run (peak resident set size from wait4, the process and
its threads), a depth-2 64-d random ViT/16 at 448 px (28 x 28 grid), 10 classes, top-10 CDAM + attention, batch
2: 11 maps of 784 scores per image, 34 KB, so holding every map in memory would add 50 MB per 1,500 images. Speed: a
ViT-S/16 at 224 px with random weights and a linear head (the explain_throughput model), top-3 CDAM, --no-panels;
seconds of the explaining loop (for --devices 2 that includes starting the two processes and loading the model
in each).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = dict(depth=2, embed_dim=64, num_heads=4)
SECTION = "explain_scale"


def make_checkpoint(path: Path, name: str, img_size: int, classes: int = 10, **overrides) -> None:
    """A cdam-pl checkpoint (head only + backbone identity) for a randomly initialised backbone."""
    import torch

    from bench.common import random_vit
    from cdam_pl.train.module import HeadClassifier

    module = HeadClassifier(random_vit(name, img_size, **overrides), [f"class{k}" for k in range(classes)])
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)


def make_images(folder: Path, n: int, size: int = 64) -> None:
    """n small random JPEGs (the model resizes them; decoding cost stays small beside the maps)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"im{i:05d}.jpg")


def peak_rss(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(peak resident memory in MiB, wall seconds) of `cmd` in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{shlex.join(cmd)} failed: {err.read().decode(errors='replace').strip()[-500:]}")
    return usage.ru_maxrss / 1024, wall


def memory(counts=(300, 1500), runs: dict[str, tuple[Path, list[str]]] | None = None,
           batch_size: int = 2) -> dict[str, dict[int, tuple[float, float]]]:
    """label -> number of images -> (peak MiB, seconds) of `explain.py --no-panels` from a checkout, with extra
    arguments: runs maps label -> (checkout, arguments)."""
    runs = runs or {"this checkout": (ROOT, [])}
    out: dict[str, dict[int, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_checkpoint(tmp / "tiny.ckpt", "vit_small_patch16_224.dino", 448, **TINY)
        make_images(tmp / "imgs", max(counts))
        for label, (tree, extra) in runs.items():
            out[label] = {}
            for n in counts:
                folder = tmp / f"imgs{n}"
                if not folder.exists():
                    folder.mkdir()
                    for p in sorted((tmp / "imgs").iterdir())[:n]:
                        (folder / p.name).symlink_to(p)
                cmd = [sys.executable, str(tree / "explain.py"), str(tmp / "tiny.ckpt"), str(folder), "--out",
                       str(tmp / f"out-{len(out)}-{n}"), "--no-panels", "--quiet", "--targets", "top10", "--methods",
                       "cdam,attention", "--batch-size", str(batch_size), "--device", "cpu", *extra]
                out[label][n] = peak_rss(cmd, tree)
    return out


def speed(n: int, quick: bool) -> dict[str, float]:
    """Seconds of the explaining loop for n images: one device, --devices 1 and (unless quick: starting two
    spawned processes costs about a minute on the shared 2-core machine) --devices 2, on CPU."""
    from cdam_pl.report import explain_to_dir

    name, size, kw = ("vit_small_patch16_224.dino", 64, TINY) if quick else ("vit_small_patch16_224.dino", 224, {})
    runs = {"one device": {"device": "cpu"}, "devices 1": {"devices": 1, "accelerator": "cpu"}}
    if not quick:
        runs["devices 2"] = {"devices": 2, "accelerator": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_checkpoint(tmp / "bench.ckpt", name, size, **kw)
        make_images(tmp / "imgs", n, size=96)
        explain = lambda label, **opts: explain_to_dir(  # noqa: E731
            tmp / "bench.ckpt", [tmp / "imgs"], tmp / label, panels=False, progress=False, batch_size=16, **opts)
        explain("warm-up", device="cpu", shard_size=16)  # first-call costs (allocator, thread pools) out of the way
        return {label: explain(label.replace(" ", "_"), **opts).seconds for label, opts in runs.items()}


def run(quick: bool = False, device: str = "cpu"):
    """Rows for bench/run_all.py: 2 CPU processes and the plain one-device loop against one Lightning process."""
    from bench.common import Row, cpu_threads

    cpu_threads("cpu")
    n = 64 if quick else 300
    s = speed(n, quick)
    model = "depth-2 64-d ViT/16 @64 px" if quick else "ViT-S/16 @224 px"
    what = f"explain.py --no-panels, {model}, top-3 CDAM, {n} images"
    base = f"--devices 1 --accelerator cpu: 1 process ({n / s['devices 1']:.1f} images/s)"
    rows = []
    if not quick:  # memory against the number of images; the time of each run rides along
        (small, (mem_s, sec_s)), (large, (mem_l, sec_l)) = sorted(memory()["this checkout"].items())
        rows.append(Row("explain_scale", f"explain.py --no-panels, {large} images, depth-2 ViT @448 px, top-10 "
                        f"CDAM + attention: peak RSS {mem_l:.0f} MiB (flat: {mem_s:.0f} MiB for {small})", sec_l,
                        f"{small} images, fresh process each", sec_s,
                        f"<= {1.1 * large / small:.1f}x (time linear in images, start-up shared)"))
    rows.append(Row("explain_scale", f"{what}, --device cpu, no Lightning ({n / s['one device']:.1f} images/s)",
                    s["one device"], base, s["devices 1"], "~1x"))
    if "devices 2" in s:
        rows.append(Row("explain_scale", f"{what}, --devices 2 --accelerator cpu: 2 processes "
                        f"({n / s['devices 2']:.1f} images/s; includes starting them)", s["devices 2"], base,
                        s["devices 1"], "(2 shared cores: no gain expected on this machine)"))
    return rows


def section(mem, spd, n_speed: int, argv: list[str]) -> str:
    """The BENCHMARKS.md section: machine, command, load, the two tables."""
    from bench.run_all import machine_info

    load = os.getloadavg()
    lines = [
        "## explain.py at scale (bench/explain_scale.py)",
        "",
        f"- Machine: {machine_info('cpu')}; no GPU was available for these figures (GPU rows: not measured)",
        f"- Command: `{shlex.join(['python', 'bench/explain_scale.py', *argv])}`",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the end: the 2 cores are shared with "
        "other work, so every figure carries that noise",
        "",
        "Peak memory of `explain.py --no-panels` (fresh process, peak RSS), depth-2 64-d random ViT/16 @448 px "
        "(28 x 28 grid), top-10 CDAM + attention (34 KB of maps per image), batch 2 (a small working set, so the peak "
        "shows what is kept rather than what one batch needs), default shard size (256):",
        "",
        "| explain.py of | " + " | ".join(f"{n} images" for n in next(iter(mem.values()))) + " | growth |",
        "|---|" + "---|" * (len(next(iter(mem.values()))) + 1),
    ]
    for label, by_n in mem.items():
        ns = sorted(by_n)
        cells = [f"{by_n[n][0]:.0f} MiB ({by_n[n][1]:.0f} s)" for n in ns]
        growth = (by_n[ns[-1]][0] - by_n[ns[0]][0]) / (ns[-1] - ns[0]) * 1000
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {growth:+.1f} MiB per 1,000 images |")
    lines += [
        "",
        f"Images per second, ViT-S/16 @224 px (random weights, linear head, 10 classes), top-3 CDAM, "
        f"--no-panels, {n_speed} JPEGs, batch 16; seconds of the explaining loop:",
        "",
        "| run | seconds | images/s |",
        "|---|---|---|",
    ]
    names = {"one device": "`--device cpu` (one process, 2 torch threads, no Lightning)",
             "devices 1": "`--devices 1 --accelerator cpu` (Lightning, 1 process, 2 threads)",
             "devices 2": "`--devices 2 --accelerator cpu` (Lightning ddp_spawn, 2 processes x 1 thread)"}
    lines += [f"| {names[k]} | {v:.2f} | {n_speed / v:.2f} |" for k, v in spd.items()]
    lines += ["| `--devices N --accelerator gpu` | not measured: no GPU in this session | |", "",
              "Two processes on 2 shared cores split the same cores one 2-thread process uses, so no gain is possible "
              "here; what --devices 2 adds is starting the spawned processes (each imports the package and loads the "
              "model). The gain comes with more cores or GPUs, each process explaining its own shards."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[300, 1500], help="image counts for the memory figure")
    p.add_argument("--speed-images", type=int, default=300)
    p.add_argument("--baseline-tree", type=Path, default=None,
                   help="another checkout (e.g. `git archive <commit> | tar -x -C DIR`) whose explain.py is measured "
                        "beside this one")
    p.add_argument("--write", type=Path, default=None, help="put the section into this markdown file")
    args = p.parse_args()
    from bench.common import cpu_threads

    cpu_threads("cpu")
    runs = {"this checkout": (ROOT, []), "this checkout, --shard-size 64": (ROOT, ["--shard-size", "64"])}
    if args.baseline_tree:
        runs[f"`{args.baseline_tree.name}` (baseline checkout: one maps.npz)"] = (args.baseline_tree.resolve(), [])
    mem = memory(tuple(args.counts), runs)
    spd = speed(args.speed_images, quick=False)
    text = section(mem, spd, args.speed_images, sys.argv[1:])
    print(text)
    if args.write:
        from bench.run_all import merge
        from cdam_pl.io import atomic_write_text

        atomic_write_text(args.write, merge(args.write, SECTION, text))


if __name__ == "__main__":
    main()

"""The evaluation's outputs, all from the per-image scores: scores.csv, results.md, results.json and the figures.

Every cell of results.md is `mean [lo, hi] (n)`: the mean of the n defined per-image scores in scores.csv and its
seeded percentile-bootstrap 95% interval (`cdam_pl.evaluate.stats`), so each one can be recomputed from the CSV.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from cdam_pl.benchmark import CONTROL, figure_grid
from cdam_pl.evaluate.scoring import HIGHER_IS_BETTER, higher_is_better, pooled_from_sums, pooled_sums
from cdam_pl.evaluate.stats import Estimate, align, bootstrap_mean, bootstrap_of_sums, paired_difference
from cdam_pl.io import atomic_write_path, atomic_write_text
from cdam_pl.viz.maps import save_png

REFERENCE = "cdam"  # the method the paired differences are taken against
GROUPS = (("map metrics", ("compactness_v1", "compactness_symmetric", "class_sensitivity", "focus", "pointing_game",
                           "relevance_mass", "relevance_rank")),
          ("faithfulness", ("deletion_token", "insertion_token", "deletion_pixel", "insertion_pixel", "road_morf",
                            "road_lerf", "road_fidelity", "random_logit")),
          ("model randomisation", None))  # None: every rand_* metric, in cascade order
# Pooled Pearson correlations between methods in the paper's first version (ImageNet, DINO ViT-S/8)
PAPER_POOLED = {("tam", "cdam"): 0.44, ("cdam", "rp"): 0.47, ("tam", "rp"): 0.34, ("cdam", "attention"): 0.12,
                ("rp", "attention"): 0.75}
METRIC_ORDER = [m for _, ms in GROUPS if ms for m in ms]


def metrics_of(results: dict[str, Any]) -> list[str]:
    """The metrics scored on a set, in table order (randomisation stages in cascade order)."""
    seen: list[str] = []
    for r in results.values():
        seen += [m for m in r.scores if m not in seen]
    return [m for m in METRIC_ORDER if m in seen] + [m for m in seen if m not in METRIC_ORDER]


def group_metrics(metrics: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for title, members in GROUPS:
        cols = [m for m in metrics if (m in members if members else m.startswith("rand_"))]
        if cols:
            out.append((title, cols))
    return out


def arrow(metric: str) -> str:
    return "↑" if higher_is_better(metric) else "↓"


def scored(set_, r, metric: str) -> tuple[list[str], np.ndarray]:
    """(image ids, scores) of one method and metric."""
    return [set_.ids[i] for i in r.score_idx[metric].tolist()], np.asarray(r.scores[metric], dtype=np.float64)


def estimates(sets, results, n_boot: int, seed: int) -> dict[str, dict[str, dict[str, Estimate]]]:
    """est[set][metric][method]: the mean of the method's per-image scores with its interval."""
    out: dict[str, dict[str, dict[str, Estimate]]] = {}
    for s in sets:
        res = results[s.name]
        out[s.name] = {m: {name: bootstrap_mean(r.scores[m], n_boot, seed) for name, r in res.items() if m in r.scores}
                       for m in metrics_of(res)}
    return out


def differences(sets, results, n_boot: int, seed: int) -> dict[str, dict[str, dict[str, Estimate]]]:
    """diff[set][metric][method]: CDAM minus the method, paired over the images both were scored on."""
    out: dict[str, dict[str, dict[str, Estimate]]] = {}
    for s in sets:
        res = results[s.name]
        if REFERENCE not in res:
            continue
        ref = res[REFERENCE]
        out[s.name] = {}
        for m in metrics_of(res):
            if m not in ref.scores:
                continue
            out[s.name][m] = {}
            for name, r in res.items():
                if name == REFERENCE or m not in r.scores:
                    continue
                a, b = align(*scored(s, ref, m), *scored(s, r, m))
                out[s.name][m][name] = paired_difference(a, b, n_boot, seed)
    return out


def pooled_correlations(s, results, names: list[str], n_boot: int, seed: int) -> dict[tuple[str, str], Estimate]:
    """Pooled Pearson correlation of the maps of target 0 between every two methods, over the images both have maps
    for, with the bootstrap interval over images."""
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = results[a], results[b]
            common = np.intersect1d(ra.idx.numpy(), rb.idx.numpy())
            pa = torch.as_tensor(np.searchsorted(ra.idx.numpy(), common))
            pb = torch.as_tensor(np.searchsorted(rb.idx.numpy(), common))
            out[(a, b)] = bootstrap_of_sums(pooled_sums(ra.maps[pa, 0], rb.maps[pb, 0]), pooled_from_sums, n_boot,
                                            seed)
    return out


def write_scores_csv(path: Path, sets, results) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["set", "image", "method", "metric", "value"])
    for s in sets:
        for name, r in results[s.name].items():
            for m in metrics_of({name: r}):
                ids, values = scored(s, r, m)
                for image, v in zip(ids, values.tolist()):
                    w.writerow([s.name, image, name, m, "" if math.isnan(v) else repr(float(v))])
    atomic_write_text(path, buf.getvalue())


def _table(rows: list[tuple[str, str]], cols: list[tuple[str, str]], cell) -> list[str]:
    """A markdown table: rows and cols are (key, heading); cell(row key, col key) -> text."""
    lines = ["| method | " + " | ".join(h for _, h in cols) + " |", "|---|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([rh] + [cell(rk, ck) for ck, _ in cols]) + " |" for rk, rh in rows]
    return lines


def render_markdown(meta: dict, sets, results, est, diff, pooled_est, timing) -> str:
    labels = meta["labels"]
    sz = meta["sizes"]
    subset = ("every image (GPU run)" if meta["everything"] else
              f"cheap methods on every image; TAM, IG and SmoothGrad on a seeded subset of {sz['expensive']} per set; "
              f"forward metrics and randomisation on {sz['faithful']} single items ({sz['faithful_expensive']} for "
              "TAM, IG and SmoothGrad)")
    lines = ["# Explanation methods evaluated", "",
             f"Checkpoint `{meta['checkpoint']}`: {meta['backbone']} at {meta['img_size']} px (patch "
             f"{meta['patch']}), {meta['classes']} classes. {meta['machine']}. Stages (maps, metrics, randomisation) "
             f"{meta['stage_s']:.0f} s of wall time summed, whichever invocation computed them; this invocation "
             f"{meta['total_s']:.0f} s to the scores, CPU time {meta['cpu_s']:.0f} s.", "",
             f"Command: `{meta['command']}`", "",
             f"Images: {subset}. Perturbation curves: {sz['steps']} steps; IG, SmoothGrad, Smooth and Integrated "
             f"CDAM: {sz['n_samples']} samples; randomisation: the head, then the last {sz['blocks']} block(s), top "
             f"down. Every cell: mean [95% bootstrap interval, {sz['bootstrap']} resamples, seed {meta['seed']}] "
             "(number of images with a defined score); ↑/↓: higher/lower is better; `random (control)` is a uniform "
             "random map, the chance level of every column. Per-image scores: scores.csv.", ""]
    for s in sets:
        res = results[s.name]
        metrics = metrics_of(res)
        rows = [(n, labels[n]) for n in res]
        lines += [f"## {s.name} ({len(s)} images)", "", s.note + ".", ""]
        for title, cols in group_metrics(metrics):
            lines += [f"### {s.name}: {title}", ""]
            lines += _table(rows, [(c, f"{c} {arrow(c)}") for c in cols],
                            lambda n, c, e=est[s.name]: e[c][n].text() if n in e[c] else "–")
            lines.append("")
        if diff.get(s.name):
            d = diff[s.name]
            lines += [f"### {s.name}: CDAM minus each method (paired bootstrap over the same images)", ""]
            lines += _table([r for r in rows if r[0] != REFERENCE], [(c, f"{c} {arrow(c)}") for c in metrics if c in d],
                            lambda n, c: _diff_cell(d[c].get(n)))
            lines += ["", "**Bold**: the interval excludes 0.", ""]
        if s.name in pooled_est:
            lines += [f"### {s.name}: pooled Pearson correlation between methods", "",
                      "Over every token score of the maps of target 0 of the images both methods have maps for "
                      "(the paper's v1 table form); interval: bootstrap over images.", "",
                      "| methods | this data | paper v1 (ImageNet, DINO ViT-S/8) |", "|---|---|---|"]
            for (a, b), e in pooled_est[s.name].items():
                ref = PAPER_POOLED.get((a, b), PAPER_POOLED.get((b, a)))
                lines.append(f"| {labels[a]} – {labels[b]} | {e.text()} | {'' if ref is None else f'{ref:.2f}'} |")
            lines.append("")
        if s.name in timing:
            t = timing[s.name]["values"]
            lines += [f"### {s.name}: seconds per image", "", "Wall time of computing the maps and of each metric "
                      "(per image scored; the forward metrics' time includes their forwards).", ""]
            lines += _table(rows, [(g, g) for g in timing[s.name]["groups"]], lambda n, g: _fmt_s(t[n].get(g)))
            lines.append("")
    return "\n".join(lines)


def _diff_cell(e: Estimate | None) -> str:
    if e is None or e.n == 0:
        return "–"
    text = f"{e.mean:+.3f} [{e.lo:+.3f}, {e.hi:+.3f}] ({e.n})"
    return f"**{text}**" if e.lo > 0 or e.hi < 0 else text


def _fmt_s(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def timings(sets, results) -> dict[str, dict[str, Any]]:
    out = {}
    for s in sets:
        groups: list[str] = []
        for r in results[s.name].values():
            groups += [g for g in r.seconds if g not in groups]
        out[s.name] = {"groups": groups, "values": {n: dict(r.seconds) for n, r in results[s.name].items()}}
    return out


def stage_seconds(results: dict[str, dict[str, Any]]) -> float:
    """Wall seconds of every map, metric and randomisation stage, summed: seconds per image times the images each
    covered. A resumed run counts each stage once, whichever invocation computed it (set building and the outputs
    themselves are not stages)."""
    total = 0.0
    for res in results.values():
        for r in res.values():
            rand = next((len(i) for m, i in r.score_idx.items() if m.startswith("rand_")), 0)
            for group, sec in r.seconds.items():
                n = len(r.idx) if group in ("maps", "map metrics") else (
                    rand if group == "randomisation" else len(r.score_idx.get(group, ())))
                total += sec * n
    return total


def bars_figure(path: Path, set_name: str, est: dict[str, dict[str, Estimate]], names: list[str],
                labels: dict[str, str]) -> None:
    """One panel per metric: each method's mean with its 95% interval."""
    metrics = [m for m in est if any(e.n for e in est[m].values())]
    cols = min(4, max(1, len(metrics)))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.9 * rows))  # no pyplot: no global figure state
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        shown = [n for n in names if n in est[m] and est[m][n].n]
        mean = np.array([est[m][n].mean for n in shown])
        err = np.array([[est[m][n].mean - est[m][n].lo for n in shown], [est[m][n].hi - est[m][n].mean for n in shown]])
        colours = ["#999999" if n == CONTROL else ("#c0392b" if n == REFERENCE else "#2c7fb8") for n in shown]
        ax.bar(range(len(shown)), mean, yerr=np.clip(err, 0, None), color=colours, capsize=2)
        ax.set_xticks(range(len(shown)), [labels[n] for n in shown], rotation=60, ha="right", fontsize=7)
        ns = sorted({est[m][n].n for n in shown})
        ax.set_title(f"{m} {arrow(m)}  (n={'/'.join(map(str, ns))})", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"{set_name}: mean and 95% bootstrap interval per method", fontsize=10)
    fig.tight_layout()
    atomic_write_path(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def examples_figure(path: Path, model, sets, results, methods: list[str], per_set: int = 2) -> None:
    """Rows = the first images of each set's expensive subset (every method has their maps), columns = the image,
    then each method's map of target 0."""
    views, maps = [], {}
    for s in sets:
        res = results[s.name]
        common = res[methods[0]].idx
        for n in methods:
            common = common[torch.isin(common, res[n].idx)]
        pick = common[:per_set]
        views.append(s.take(pick))
        maps[s.name] = {n: res[n].maps[torch.searchsorted(res[n].idx, pick)] for n in methods}
    save_png(figure_grid(model, views, maps, methods, per_set=per_set), path)


def write_outputs(out: Path, model, sets, results, meta: dict, n_boot: int, seed: int) -> dict[str, Any]:
    """scores.csv, results.md, results.json, bars_<set>.png and examples.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_scores_csv(out / "scores.csv", sets, results)
    est = estimates(sets, results, n_boot, seed)
    diff = differences(sets, results, n_boot, seed)
    names = list(meta["methods"]) + [CONTROL]
    pooled_est = {s.name: pooled_correlations(s, results[s.name], [n for n in names if n in results[s.name]],
                                              n_boot, seed) for s in sets if s.name == "fmnist"}
    timing = timings(sets, results)
    meta["stage_s"] = stage_seconds(results)
    for s in sets:
        bars_figure(out / f"bars_{s.name}.png", s.name, est[s.name], [n for n in names if n in results[s.name]],
                    meta["labels"])
    examples_figure(out / "examples.png", model, sets, results, list(meta["methods"]))
    atomic_write_text(out / "results.md", render_markdown(meta, sets, results, est, diff, pooled_est, timing))
    summary = {"meta": meta,
               "estimates": {s: {m: {n: vars(e) for n, e in by.items()} for m, by in ms.items()} for s, ms in
                             est.items()},
               "differences": {s: {m: {n: vars(e) for n, e in by.items()} for m, by in ms.items()} for s, ms in
                               diff.items()},
               "pooled": {s: {f"{a}-{b}": vars(e) for (a, b), e in p.items()} for s, p in pooled_est.items()},
               "seconds": timing, "higher_is_better": HIGHER_IS_BETTER}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1, default=str, allow_nan=True))
    return summary

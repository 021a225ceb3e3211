"""explain.py's engine: explain any images with a trained head and write panels, raw maps, a manifest and a gallery.

    from cdam_pl.report import explain_to_dir
    summary = explain_to_dir("last.ckpt", ["photos/"], "explained", methods="cdam,attention", targets="top3")

`targets.py` resolves what to explain, `inputs.py` sizes, loads and batches the images and builds concept vectors,
`run.py` runs the methods of the registry on every batch of every shard and resumes killed runs, `devices.py` runs
the shards as Lightning prediction on several devices, `outputs.py` writes the panels, manifest and gallery (the
maps go through `cdam_pl.store`), `cli.py` is the command line.
"""
from cdam_pl.report.cli import build_parser, main
from cdam_pl.report.inputs import keep_aspect_size, parse_concepts
from cdam_pl.report.outputs import default_render_processes
from cdam_pl.report.run import MANIFEST_FORMAT, ExplainOptions, RunSummary, explain_to_dir, resolve_device
from cdam_pl.report.targets import TargetSpec, default_targets, parse_targets
from cdam_pl.store.shards import MAPS_LAYOUT

__all__ = [
    "MANIFEST_FORMAT",
    "MAPS_LAYOUT",
    "ExplainOptions",
    "RunSummary",
    "TargetSpec",
    "build_parser",
    "default_render_processes",
    "default_targets",
    "explain_to_dir",
    "keep_aspect_size",
    "main",
    "parse_concepts",
    "parse_targets",
    "resolve_device",
]

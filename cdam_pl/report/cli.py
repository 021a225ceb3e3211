"""explain.py's command line: every option maps onto one `ExplainOptions` field; user errors are one line."""
from __future__ import annotations

import argparse
from typing import Sequence

from cdam_pl.app.server import serve
from cdam_pl.cli import run_cli
from cdam_pl.errors import CdamError, ConfigError
from cdam_pl.explain.cdam import SIMILARITIES
from cdam_pl.explain.registry import METHODS
from cdam_pl.report.outputs import PANEL_TARGETS
from cdam_pl.report.run import ExplainOptions, explain_to_dir
from cdam_pl.store.shards import DEFAULT_SHARD_SIZE, MAP_DTYPES, MAPS_LAYOUT, MAX_SHARD_SIZE

DESCRIPTION = """\
Explain a trained head's decisions on any images with class-discriminative attention maps (CDAM).

Point it at a checkpoint written by train.py and at images (files, folders searched recursively, or globs).
For every image it writes a PNG panel (the image, then one overlay per target and method, titled with the class
or concept, logit and probability, each with a diverging colour bar: red = evidence for, blue = against), the raw
signed token scores in shards under maps/ (written as the run goes, so memory stays flat however many images),
a manifest.json (checkpoint, backbone, image sizes, per image the targets, logits, probabilities, methods and
their parameters, package versions) and index.html, a gallery that opens offline in a browser. Unreadable images
are skipped with a warning and listed in the manifest.

A run that is killed resumes: run the same command into the same --out and it skips the shards already written
("resuming: N of M images already explained") and ends with exactly the maps of an uninterrupted run. A folder
holding a run with another checkpoint, methods, targets or other settings is refused."""

EPILOG = """\
examples:
  python explain.py runs/demo/version_0/checkpoints/last.ckpt photos/ --out explained
  python explain.py last.ckpt 'shots/**/*.jpg' --targets pred --methods cdam,attention --keep-aspect
  python explain.py last.ckpt cat.jpg --targets cat,dog --methods cdam,smooth,integrated --n-samples 20
  python explain.py last.ckpt imgs/ --concept stripes=examples/stripes --concept fur=examples/fur --similarity cosine
  python explain.py last.ckpt imgs/ --img-size 224 336 --batch-size 32 --device cuda
  python explain.py last.ckpt val/ --no-panels --devices 4 --accelerator gpu --dtype float16

methods:
{methods}

maps layout (read them with cdam_pl.load_explanations(OUT): image path -> .maps, .targets, .logits, ...):
{layout}
  rows of a method: the K targets (in --targets order, or by logit for topN), then the M concepts for methods that
  explain concepts; class-agnostic methods have a single row.

exit status: 0 on success, 2 for a user error (one line on stderr), 130 when interrupted."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other user error, instead of usage + message
        raise ConfigError(f"{message}; see explain.py --help")


def build_parser() -> argparse.ArgumentParser:
    known = METHODS
    width = max(len(n) for n in known) + 2
    epilog = EPILOG.format(
        methods="\n".join(f"  {n:<{width}}{m.description}" for n, m in known.items()),
        layout="\n".join(f"  {k:<20}{v}" if k.startswith("{") else f"  {k}\n  {'':<20}{v}"
                          for k, v in MAPS_LAYOUT.items()),
    )
    p = _Parser(prog="explain.py", description=DESCRIPTION, epilog=epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .ckpt written by train.py (read with weights_only=True)")
    p.add_argument("inputs", metavar="INPUT", nargs="*", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--serve", action="store_true",
                   help="instead of writing files, start the local web demo on 127.0.0.1 (see cdam_pl.app)")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port of the web demo (with --serve)")
    p.add_argument("--targets", default=None, metavar="SPEC",
                   help="what to explain: topN (the N highest logits; default top3, or every class of a head with "
                        "fewer), pred (the predicted class), all (every class of the head, in its order: about one "
                        "plain forward even for 1,000 classes; panels draw the top "
                        f"{PANEL_TARGETS}), or class names separated by commas (case-insensitive), e.g. cat,dog")
    p.add_argument("--concept", action="append", default=[], metavar="NAME=DIR",
                   help="a concept given by a folder of example images (its vector is their mean embedding); "
                        "shown as extra maps of the methods that explain concepts. Repeat for several concepts")
    p.add_argument("--similarity", choices=SIMILARITIES, default="dot",
                   help="similarity of an image to a concept vector (default: dot, as in the paper)")
    p.add_argument("--methods", default="cdam", metavar="LIST",
                   help=f"comma-separated methods (default: cdam); available: {', '.join(known)}")
    p.add_argument("--out", default="explanations", metavar="DIR",
                   help="output folder for panels/, maps/, manifest.json, index.html (default: explanations); "
                        "a folder holding an interrupted run of the same command is resumed")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--img-size", nargs=2, type=int, metavar=("H", "W"),
                      help="resize every image to H x W (multiples of the patch size); default: the image size "
                           "the head was trained at")
    size.add_argument("--keep-aspect", action="store_true",
                      help="keep each image's aspect ratio: about the training image area, each side rounded to a "
                           "multiple of the patch size (the patch grid follows the image)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="images per forward pass (images of different sizes never share a batch; default: 16)")
    p.add_argument("--device", default=None, metavar="cpu|cuda",
                   help="the one device to run on (default: cuda when available, else cpu)")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="run as Lightning prediction on N devices instead (N CPU processes, or N GPUs), each "
                        "explaining a fixed share of the shards; same maps as one device")
    p.add_argument("--accelerator", default=None, metavar="cpu|gpu|auto",
                   help="the kind of device for --devices (default: auto)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="backbone weights file, if it moved since training (its sha256 must match the checkpoint)")
    p.add_argument("--n-samples", type=int, default=None, metavar="N",
                   help="noisy samples for smooth (and other sampling methods); default: each method's own (50)")
    p.add_argument("--noise", type=float, default=None, metavar="LAMBDA",
                   help="noise scale as a fraction of the input's range; default: each method's own "
                        "(smooth 0.05, integrated 0)")
    p.add_argument("--n-steps", type=int, default=None, metavar="N",
                   help="path steps for integrated (and other path methods); default: each method's own (50)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the noise of sampling methods, re-applied at the start of every batch (default: 0)")
    p.add_argument("--no-panels", action="store_true",
                   help="write maps/ and manifest.json only (no PNGs, no gallery): drawing the panels takes "
                        "far longer than computing the maps")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                   help=f"input images per shard of maps/, written as soon as it is done: the unit a killed run "
                        f"resumes from and what memory holds (default: {DEFAULT_SHARD_SIZE}, at most "
                        f"{MAX_SHARD_SIZE})")
    p.add_argument("--dtype", choices=MAP_DTYPES, default="float32",
                   help="how the maps are stored: float32 (default) or float16 (half the size; recorded in the "
                        "manifest, read back as float32)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="threads that read and resize images (default: min(4, CPUs))")
    p.add_argument("--render-processes", type=int, default=None, metavar="N",
                   help="processes that draw the PNG panels (default: none below 16 images or 4 CPUs, else one "
                        "per two CPUs, at most 8)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The explain.py command line; returns the exit status (2 with one line on stderr for user errors)."""
    def run() -> int:
        args = build_parser().parse_args(argv)
        if args.serve:
            return serve(args.checkpoint, args.port, weights=args.weights, device=args.device or "cpu")
        if not args.inputs:
            raise CdamError("no INPUT given: name image files, folders or globs (or use --serve for the web demo)")
        options = ExplainOptions(
            targets=args.targets, methods=args.methods, concepts=args.concept, similarity=args.similarity,
            img_size=args.img_size, keep_aspect=args.keep_aspect, batch_size=args.batch_size, device=args.device,
            weights=args.weights, n_samples=args.n_samples, noise=args.noise, n_steps=args.n_steps, seed=args.seed,
            panels=not args.no_panels, workers=args.workers, render_processes=args.render_processes,
            progress=not args.quiet, shard_size=args.shard_size, dtype=args.dtype, devices=args.devices,
            accelerator=args.accelerator)
        summary = explain_to_dir(args.checkpoint, args.inputs, args.out, options)
        if not args.quiet:
            skipped = f", {len(summary.skipped)} skipped" if summary.skipped else ""
            resumed = f" ({summary.resumed} by an earlier run)" if summary.resumed else ""
            print(f"explained {summary.explained} images{resumed}{skipped} with {', '.join(summary.methods)} in "
                  f"{summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s)")
            if "index" in summary.files:
                print(f"gallery:  {summary.files['index']}")
            print(f"maps:     {summary.files['maps']}\nmanifest: {summary.files['manifest']}")
        return 0

    return run_cli(run)

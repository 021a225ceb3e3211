#!/usr/bin/env python
"""Explain a trained head's decisions on any images with CDAM: panels, raw maps, a manifest and a gallery.

    python explain.py runs/demo/version_0/checkpoints/last.ckpt photos/ --out explained
    python explain.py last.ckpt 'shots/**/*.jpg' --targets pred --methods cdam,smooth,attention --keep-aspect
    python explain.py last.ckpt imgs/ --concept stripes=examples/stripes --targets cat,dog

`python explain.py --help` documents every option and the layout of the outputs; the logic is in cdam_pl.report.
"""
import sys


def main(argv=None) -> int:
    from cdam_pl.report import main as report_main

    return report_main(argv)


if __name__ == "__main__":
    sys.exit(main())

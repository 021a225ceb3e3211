"""Compare every explanation method on a checkpoint (thin wrapper around `python -m cdam_pl.benchmark`).

    python bench/methods.py [--checkpoint PATH] [--out bench/out/methods] [--quick] ...

See `python -m cdam_pl.benchmark --help` for the options.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402,F401  (sets HF_HUB_OFFLINE before anything loads timm)
from cdam_pl.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

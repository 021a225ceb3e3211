"""Shared CLI plumbing: user errors become one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Iterable

from cdam_pl.errors import CdamError

EXIT_USER_ERROR = 2


def run_cli(fn: Callable[[], int]) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return fn()
    except CdamError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def check_positive(args: argparse.Namespace, keys: Iterable[str]) -> None:
    """A one-line CdamError for the first option among `keys` given a value below 1 (unset options are None)."""
    for key in keys:
        v = getattr(args, key)
        if v is not None and v < 1:
            raise CdamError(f"--{key.replace('_', '-')} must be >= 1, got {v}")

"""python -m cdam_pl.evaluate: see `cdam_pl.evaluate.run`."""
import sys

from cdam_pl.evaluate.run import main

sys.exit(main())

"""`python -m cdam_pl.app CHECKPOINT [--port N]`: run the web demo (see `cdam_pl.app.server.main`)."""
import sys

from cdam_pl.app.server import main

sys.exit(main())

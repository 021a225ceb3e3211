"""A local web demo: pick or upload an image, see the head's top-5, click a class for its CDAM overlay beside the
attention map, define a concept from 1-5 example images, switch vanilla/Smooth/Integrated CDAM, download the panel
PNG and the raw map.

    python -m cdam_pl.app runs/demo/version_0/checkpoints/last.ckpt --port 8000     # then open the printed URL

`engine` explains and renders (no HTTP in it), `examples` finds the example images, `server` is the HTTP side and
the command line; the page itself is in `static/`.
"""
from cdam_pl.app.engine import VARIANTS, DemoEngine, decode_image
from cdam_pl.app.examples import Example, demo_examples
from cdam_pl.app.server import DemoServer, main, make_server, serve

__all__ = [
    "VARIANTS",
    "DemoEngine",
    "DemoServer",
    "Example",
    "decode_image",
    "demo_examples",
    "make_server",
    "serve",
    "main",
]

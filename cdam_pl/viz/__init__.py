"""Pictures of token maps (CDAM scores, attention, ...) as uint8 RGB arrays ``[H, W, 3]``.

`maps` turns one map into colours (display range, colormap, overlay on its image, PNG files); `figures` lays
several out (panel, strip, confusion matrix). Inside `cdam_pl`, import from those modules; this face re-exports
their public names for users.
"""
from cdam_pl.viz.figures import confusion_image, panel, strip
from cdam_pl.viz.maps import (
    DEFAULT_CMAP,
    DEFAULT_Q,
    DISPLAY_Q,
    colorize,
    display_range,
    overlay,
    resolve_vmax,
    save_png,
    to_uint8_image,
    upsample,
)

__all__ = [
    "DEFAULT_CMAP",
    "DEFAULT_Q",
    "DISPLAY_Q",
    "upsample",
    "display_range",
    "resolve_vmax",
    "colorize",
    "to_uint8_image",
    "overlay",
    "save_png",
    "panel",
    "strip",
    "confusion_image",
]

"""Hypothesis fuzzing of the doors untrusted input comes through: `key=value` config overrides and image files
(random bytes, damaged valid files, odd file names). Each example either succeeds or raises the documented one-line
error type (ConfigError, DataError); anything else, or an example that runs past a watchdog, fails the test."""
from __future__ import annotations

import io
import json
import os
import signal
import typing
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from cdam_pl.config import Config, load_config, to_container
from cdam_pl.data import check_image, load_image, path_text
from cdam_pl.errors import ConfigError, DataError

FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
WATCHDOG_S = 10.0  # one example taking this long counts as a hang


class Hang(Exception):
    pass


@contextmanager
def watchdog(seconds: float = WATCHDOG_S):
    """Raise `Hang` in this (main) thread if the block runs longer than `seconds`."""
    def fire(signum, frame):
        raise Hang(f"example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------- config overrides


def _schema_keys() -> list[str]:
    """Every leaf key of the schema, plus keys under its free-form mappings (trainer.*, backbone.kwargs.*, ...)."""
    import lightning as L

    keys = []

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            keys.append(f"{prefix}{k}")

    walk(OmegaConf.to_container(OmegaConf.structured(Config)), "")
    trainer_args = [k for k in typing.get_type_hints(L.Trainer.__init__) if k != "return"]
    return sorted(set(keys) | {f"trainer.{k}" for k in trainer_args}
                  | {"backbone.kwargs.depth", "explain.concepts.stripes", "nope", "data.nope", "trainer.nope"})


KEYS = _schema_keys()
AWKWARD = ["", "null", "~", "true", "False", "[]", "{}", "[1,2]", "[32, 48]", "[a", "{a: 1", "]", "'quoted'", '"x"',
           "${data.name}", "${seed}", "${nope}", "${oc.env:HOME}", "${oc.env:NO_SUCH_VARIABLE}", "${data.batch_size}",
           "---", "- a", ": :", "a: b", "&anchor x", "*alias", ".nan", ".inf", "-.inf", "1e309", "0x10", "1_000",
           "!!python/object/apply:os.system ['echo pwned']", "!!binary aGVsbG8=", "\x00", "é", "\ud800"]
VALUES = st.one_of(st.sampled_from(AWKWARD), st.integers(-10**12, 10**12).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=24))
OVERRIDE = st.one_of(st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
                     st.text(max_size=30))  # also things that are not key=value at all


@FUZZ
@given(st.lists(OVERRIDE, max_size=4))
def test_config_overrides_give_a_config_or_a_config_error(overrides):
    with watchdog():
        try:
            cfg = load_config(None, overrides)
        except ConfigError as e:
            assert str(e) and "\n" not in str(e), str(e)
            return
        assert isinstance(cfg, DictConfig)
        container = to_container(cfg)  # what training and checkpoints use: fully resolved plain data
        json.dumps(container, default=str)
        assert isinstance(container["data"]["batch_size"], int) and container["data"]["batch_size"] > 0


def test_yaml_tags_never_construct_objects(tmp_path):
    """A config is data: YAML tags that would build Python objects are refused, never executed."""
    marker = tmp_path / "marker"
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    with pytest.raises(ConfigError):
        load_config(None, [f"data.root={payload}"])
    (tmp_path / "evil.yaml").write_text(f"data:\n  root: {payload}\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml is not readable YAML"):
        load_config(tmp_path / "evil.yaml")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- image files


def _seeds() -> list[bytes]:
    """Small valid files of every common format and mode: starting points for mutation."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    out = []
    for im, fmt, kw in [(rgb, "PNG", {}), (rgb.convert("RGBA"), "PNG", {}), (rgb.convert("P"), "PNG", {}),
                        (Image.fromarray(rng.integers(0, 65536, (8, 8)).astype(np.uint16)), "PNG", {}),
                        (rgb, "JPEG", {"quality": 80}), (rgb.convert("L"), "JPEG", {"progressive": True}),
                        (rgb.convert("P"), "GIF", {}), (rgb, "BMP", {}), (rgb, "TIFF", {}),
                        (rgb, "TIFF", {"compression": "tiff_deflate"}), (rgb, "WEBP", {}), (rgb, "PPM", {})]:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()


@st.composite
def damaged_files(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for pos, value in draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8)):
        data[pos % len(data)] = value  # overwrite bytes: headers, sizes, chunk lengths, compressed data
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    if cut is not None:
        data = data[:cut]  # truncated copy
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=64))  # inserted garbage
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_images")


def _check_loader(path: Path) -> None:
    with watchdog():
        reason = check_image(path)
        assert reason is None or (isinstance(reason, str) and "\n" not in reason)
        try:
            im = load_image(path)
        except DataError as e:
            msg = str(e)
            assert "\n" not in msg and msg.startswith(f"cannot read image {path_text(path)}: "), msg
            return
        assert isinstance(im, Image.Image) and im.mode == "RGB" and im.width > 0 and im.height > 0
        im.getpixel((0, 0))  # fully loaded


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from([".png", ".jpg", ".gif", ".tif", ".webp", ".bin"]))
def test_image_loader_on_random_bytes_gives_an_rgb_image_or_a_data_error(scratch, data, suffix):
    path = scratch / f"random{suffix}"
    path.write_bytes(data)
    _check_loader(path)


@FUZZ
@given(damaged_files())
def test_image_loader_on_damaged_valid_files_gives_an_rgb_image_or_a_data_error(scratch, data):
    path = scratch / "damaged.img"
    path.write_bytes(data)
    _check_loader(path)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\x00" not in b
                                                 and b not in (b".", b"..")))
def test_any_file_name_loads_and_prints_as_utf8(scratch, name):
    """File names are bytes on Linux: whatever they hold, the image loads and its path prints as valid UTF-8."""
    path = Path(os.fsdecode(os.path.join(os.fsencode(scratch), name)))
    path.write_bytes(SEEDS[0])
    try:
        assert load_image(path).size == (10, 12)
        text = path_text(path)
        text.encode("utf-8")  # strict: no lone surrogates left
        assert json.loads(json.dumps(text)) == text
    finally:
        path.unlink()

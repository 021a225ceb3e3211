"""The web demo without a browser: uploads decode like load_image, the maps it shows equal the naive CDAM oracle,
one model pass per image serves every class, bad input becomes a message (never a crash), the page loads nothing
from outside the machine. The real-browser test is tests/test_app_browser.py."""
from __future__ import annotations

import io
import json
import re
import socket
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from cdam_pl.app import DemoEngine, DemoServer, decode_image, demo_examples, main, make_server
from cdam_pl.checkpoint import load_checkpoint
from cdam_pl.data import build_transform, load_image
from cdam_pl.errors import CdamError, DataError
from cdam_pl.errors import RequestError as HttpError  # the user errors that carry an HTTP status
from cdam_pl.explain import CDAM
from cdam_pl.explain.reference import naive_cdam

ATOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture
def engine(model):
    return DemoEngine(model, n_samples=3, n_steps=4)


@pytest.fixture(scope="module")
def server(model):
    engine = DemoEngine(model, examples=demo_examples(model.config, model.backbone), n_samples=3, n_steps=4,
                        max_upload_bytes=50_000)
    srv = DemoServer(engine, 0, quiet=True).start()
    yield srv
    srv.close()


def digit(i: int, size: int = 24) -> Image.Image:
    """A scikit-learn digit as an RGB image (the tiny checkpoint's domain)."""
    from sklearn.datasets import load_digits

    d = load_digits().images[i]  # [8, 8] in 0..16
    return Image.fromarray(np.uint8(d * 15)).resize((size, size), Image.NEAREST).convert("RGB")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def model_input(model, img: Image.Image) -> torch.Tensor:
    return build_transform(model.backbone.img_size, **model.backbone.data_config)(img)[None]  # [1, 3, H, W]


def oracle(model, x, cls: int) -> np.ndarray:
    """Class map from the literal definition (full autograd through the model, hooks on norm1)."""
    return naive_cdam(model.backbone, lambda e: model.head(e)[:, cls], x)[0].numpy()


def request(srv, path, data=None, method=None, headers=None):
    """-> (status, headers, body bytes); HTTP errors are returned, not raised."""
    req = urllib.request.Request(srv.url.rstrip("/") + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post_json(srv, path, data=b"", headers=None):
    status, _, body = request(srv, path, data=data, method="POST", headers=headers)
    return status, json.loads(body)


def get_json(srv, path):
    status, _, body = request(srv, path)
    return status, json.loads(body)


def multipart(fields: dict[str, str], files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for name, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
                  f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# ----------------------------------------------------------------------------------------------------------------
# decoding uploads
# ----------------------------------------------------------------------------------------------------------------


def _rgba():
    a = np.random.default_rng(0).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    return Image.fromarray(a, "RGBA")


def _exif_rotated_jpeg():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    return encode(img, "JPEG", exif=exif)


UPLOADS = {
    "png-rgba": lambda: encode(_rgba()),
    "png-16bit-gray": lambda: encode(Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)),
    "gif-palette-transparency": lambda: encode(_rgba().convert("P"), "GIF", transparency=3),
    "jpeg-exif-orientation": _exif_rotated_jpeg,
    "bmp-gray": lambda: encode(Image.fromarray(np.uint8(np.arange(600).reshape(20, 30) % 256)), "BMP"),
}


@pytest.mark.parametrize("kind", list(UPLOADS))
def test_decoded_upload_equals_load_image_of_the_same_file(kind, tmp_path):
    data = UPLOADS[kind]()
    path = tmp_path / "img"
    path.write_bytes(data)
    want = load_image(path)
    got = decode_image(data, "x")
    assert got.mode == "RGB" and got.size == want.size
    assert np.array_equal(np.asarray(got), np.asarray(want))
    if kind == "jpeg-exif-orientation":
        assert got.size == (16, 40)  # (W, H): the 40x16 picture stands upright


@pytest.mark.parametrize("data, words", [
    (b"", "empty (0 bytes)"),
    (b"hello, this is text, not a picture", "not a recognised image format"),
    (encode(digit(0))[:60], "cannot read 'bad.png'"),  # truncated PNG
])
def test_bad_uploads_are_one_line_data_errors(data, words):
    with pytest.raises(DataError) as e:
        decode_image(data, "'bad.png'")
    msg = str(e.value)
    assert words in msg and "\n" not in msg and ("choose" in msg)


def test_images_with_too_many_pixels_are_refused_before_decoding():
    with pytest.raises(DataError, match="decompression bomb.*1200 pixels exceeds the limit of 1000"):
        decode_image(encode(Image.new("RGB", (40, 30))), "big.png", max_pixels=1000)
    assert decode_image(encode(Image.new("RGB", (40, 25))), "ok.png", max_pixels=1000).size == (40, 25)


# ----------------------------------------------------------------------------------------------------------------
# the engine: what the page shows equals the method, one pass per image
# ----------------------------------------------------------------------------------------------------------------


def test_top5_and_every_class_map_match_an_independent_forward_and_the_naive_oracle(engine, model):
    img = digit(3)
    s = engine.add_upload(encode(img), "three.png")
    x = model_input(model, img)
    with torch.no_grad():
        probs = model.head(model.backbone(x)).softmax(1)[0]  # [C], an independent forward
    order = probs.argsort(descending=True)[:5].tolist()
    assert [t["index"] for t in s["top"]] == order
    assert np.allclose([t["prob"] for t in s["top"]], probs[order].numpy(), atol=1e-5)
    assert s["input_size"] == [32, 32] and s["grid"] == [2, 2] and not s["cached"]
    assert torch.equal(engine._image(s["id"]).x, x)  # the same preprocessing as training's eval transform
    assert engine.explain_calls == 1
    for c in range(len(model.classes)):
        assert np.allclose(engine.map(s["id"], f"c{c}"), oracle(model, x, c), atol=ATOL), c
        engine.overlay_png(s["id"], f"c{c}")
    assert engine.explain_calls == 1  # all ten classes came from the upload's single pass


def test_attention_is_the_last_block_cls_attention(engine, model):
    img = digit(5)
    s = engine.add_upload(encode(img), "five.png")
    blk = model.backbone.model.blocks[-1]
    seen = {}
    h = blk.norm1.register_forward_hook(lambda m, i, o: seen.__setitem__("t", o))
    with torch.no_grad():
        model.backbone(model_input(model, img))
    h.remove()
    a = blk.attn
    qkv = a.qkv(seen["t"]).reshape(1, -1, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    probs = (qkv[0] @ qkv[1].transpose(-2, -1) * a.scale).softmax(-1)[0, :, 0, 1:]  # [heads, N]
    assert np.allclose(engine._image(s["id"]).attention.reshape(a.num_heads, -1), probs.numpy(), atol=1e-6)


def test_overlays_of_two_classes_differ_and_match_viz_overlay(engine):
    from cdam_pl import viz

    s = engine.add_upload(encode(digit(7)), "seven.png")
    a, b = s["top"][0]["target"], s["top"][1]["target"]
    pa = np.asarray(Image.open(io.BytesIO(engine.overlay_png(s["id"], a))))
    pb = np.asarray(Image.open(io.BytesIO(engine.overlay_png(s["id"], b))))
    display = engine._image(s["id"]).display
    assert pa.shape == display.shape and display.shape[:2] == (320, 320)  # 24 px digit shown at 320 px
    assert np.array_equal(pa, viz.overlay(display, engine.map(s["id"], a), q=0.01))
    assert np.abs(pa.astype(int) - pb.astype(int)).mean() > 1.0


def test_same_pixels_in_another_file_format_hit_the_cache(engine):
    img = digit(2)
    first = engine.add_upload(encode(img, "PNG"), "two.png")
    again = engine.add_upload(encode(img, "BMP"), "two.bmp")
    assert again["id"] == first["id"] and again["cached"] and engine.explain_calls == 1


def test_cache_keeps_the_most_recent_images_only(model):
    engine = DemoEngine(model, cache_size=2)
    ids = [engine.add_image(digit(i), f"{i}.png")["id"] for i in range(3)]
    engine.map(ids[1], "c0")
    with pytest.raises(HttpError, match="no longer in the server's cache.*upload or pick it again") as e:
        engine.map(ids[0], "c0")
    assert e.value.status == 404


def test_every_class_of_a_1000_class_head_is_explained_in_the_first_pass(model):
    """No cap: one pass computes all 1,000 classes' maps (each equal to the literal definition); clicking any class
    then computes nothing."""
    import dataclasses

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(model.backbone.feature_dim, 1000).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1000, model.backbone.feature_dim, generator=g))
    big = dataclasses.replace(model, head=head, classes=[f"class {i}" for i in range(1000)])
    engine = DemoEngine(big)
    img = digit(4)
    s = engine.add_image(img, "four")
    assert s["classes_explained"] == 1000 and s["seconds"] > 0
    x = model_input(big, img)
    for c in (0, 417, 999, s["top"][0]["index"]):
        assert np.allclose(engine.map(s["id"], f"c{c}"), oracle(big, x, c), atol=ATOL)
    assert engine.explain_calls == 1


def test_smooth_and_integrated_maps_are_the_engines_seeded_variants(engine, model):
    img = digit(8)
    s = engine.add_image(img, "eight")
    x = model_input(model, img)
    c = s["top"][1]["index"]
    smooth = engine.map(s["id"], f"c{c}", "smooth")
    ref = CDAM(model.backbone, model.head).class_maps(x, [c], variant="smooth", n_samples=3,
                                                      generator=torch.Generator().manual_seed(0))[0, 0]
    assert np.allclose(smooth, ref.numpy(), atol=1e-6)
    # Integrated (zero baseline, k/m scaling, no noise) against the oracle: mean over k = 1..m-1 of naive CDAM
    m = 4
    ref_ig = sum(naive_cdam(model.backbone, lambda e: model.head(e)[:, c], x, lambda z, s=k / m: z * s)
                 for k in range(1, m)) / (m - 1)
    assert np.allclose(engine.map(s["id"], f"c{c}", "integrated"), ref_ig[0].numpy(), atol=ATOL)
    calls = engine.explain_calls
    engine.overlay_png(s["id"], f"c{c}", "smooth")
    engine.overlay_png(s["id"], f"c{c}", "integrated")
    assert engine.explain_calls == calls
    assert not np.allclose(smooth, engine.map(s["id"], f"c{c}"))


def test_concept_map_equals_the_oracle_for_the_mean_embedding_of_the_examples(engine, model):
    examples = [digit(i) for i in (0, 10, 20)]  # three zeros
    info = engine.add_concept("  round  things ", [(f"{i}.png", encode(e)) for i, e in enumerate(examples)])
    assert info == {"target": "k1", "name": "round things", "n_images": 3}
    img = digit(6)
    s = engine.add_image(img, "six")
    x = model_input(model, img)
    with torch.no_grad():
        v = model.backbone(torch.cat([model_input(model, e) for e in examples])).mean(0)  # [D]
    assert np.allclose(engine.map(s["id"], "k1"), naive_cdam(model.backbone, lambda e: e @ v, x)[0].numpy(),
                       atol=ATOL)
    assert engine.explain_calls == 1  # concepts defined before an upload come with its single pass
    r = engine.explain(s["id"], "k1")
    assert r["kind"] == "concept" and r["label"] == "concept: round things" and not r["computed"]
    with torch.no_grad():
        assert abs(r["similarity"] - float(model.backbone(x)[0] @ v)) < 1e-4


@pytest.mark.parametrize("n, words", [(0, "has no example images; choose 1 to 5"),
                                      (6, "got 6 images; choose at most 5")])
def test_concepts_need_one_to_five_images(engine, n, words):
    with pytest.raises(DataError, match=words):
        engine.add_concept("stripes", [(f"{i}.png", encode(digit(i))) for i in range(n)])


def test_a_bad_concept_example_is_named_in_the_message(model):
    engine = DemoEngine(model, max_upload_bytes=2000)
    with pytest.raises(DataError, match="concept example 'notes.txt'.*not a recognised image format"):
        engine.add_concept("x", [("a.png", encode(digit(1))), ("notes.txt", b"not an image")])
    with pytest.raises(DataError, match="concept example 'big.bmp' is larger than the limit of 2 KB"):
        engine.add_concept("x", [("a.png", encode(digit(1))), ("big.bmp", encode(digit(1, 64), "BMP"))])


def test_raw_map_download_holds_the_unclipped_map_and_what_it_refers_to(engine):
    s = engine.add_image(digit(9), "nine.png")
    t = s["top"][2]["target"]
    with np.load(io.BytesIO(engine.raw_npz(s["id"], t)), allow_pickle=False) as z:
        assert np.array_equal(z["map"], engine.map(s["id"], t).astype(np.float32))
        assert z["attention"].shape == (4, 2, 2) and z["logits"].shape == (10,)
        assert str(z["target"]) == t and str(z["variant"]) == "vanilla" and str(z["label"]) == t[1:]
        assert list(z["input_size"]) == [32, 32] and list(z["classes"]) == [str(i) for i in range(10)]
    assert engine.download_name(s["id"], t, "vanilla", "_map.npz") == f"nine_{t[1:]}_vanilla_map.npz"


def test_panel_download_is_a_png_with_image_overlay_and_attention(engine):
    s = engine.add_image(digit(1), "one")
    pic = Image.open(io.BytesIO(engine.panel_png(s["id"], s["top"][0]["target"])))
    assert pic.format == "PNG" and pic.mode == "RGB"
    assert pic.width > 2.5 * pic.height  # three cells side by side, plus colour bars


@pytest.mark.parametrize("target, variant, status, words", [
    ("c10", "vanilla", 400, "unknown target 'c10'"),
    ("k99", "vanilla", 404, "concept is no longer defined"),
    ("c1", "gradcam", 400, "unknown method 'gradcam'; choose one of vanilla, smooth, integrated"),
])
def test_bad_targets_and_methods_are_messages(engine, target, variant, status, words):
    s = engine.add_image(digit(1), "one")
    with pytest.raises(HttpError, match=words) as e:
        engine.explain(s["id"], target, variant)
    assert e.value.status == status


# ----------------------------------------------------------------------------------------------------------------
# examples
# ----------------------------------------------------------------------------------------------------------------


def test_examples_are_bundled_photos_and_validation_images_of_distinct_classes(model):
    ex = demo_examples(model.config, model.backbone, n_validation=4)
    assert [e.id for e in ex[:4]] == ["chelsea", "coffee", "astronaut", "grace_hopper"]
    val = [e for e in ex if e.source == "validation"]
    assert len(val) == 4
    labels = [re.search(r"true: (\w+)\)", e.name).group(1) for e in val]
    assert len(set(labels)) == 4
    assert all(e.image.mode == "RGB" and e.image.size == (8, 8) for e in val)  # digits are 8x8


def test_examples_skip_validation_data_that_is_not_on_this_machine(model, tmp_path):
    notes = []
    cfg = {"data": {"name": "imagefolder", "root": str(tmp_path / "moved")}}
    ex = demo_examples(cfg, model.backbone, warn=notes.append)
    assert [e.source for e in ex] == ["scikit-image"] * 3 + ["matplotlib"]
    assert len(notes) == 1 and notes[0].startswith("note: no validation examples") and "\n" not in notes[0]


# ----------------------------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------------------------


def test_server_listens_on_loopback_only(server):
    assert server.server_address[0] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")


def test_page_and_assets_reference_nothing_outside_the_server(server):
    for path, ctype in [("/", "text/html"), ("/static/app.js", "text/javascript"), ("/static/app.css", "text/css")]:
        status, headers, body = request(server, path)
        assert status == 200 and headers["Content-Type"].startswith(ctype)
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        text = body.decode()
        assert not re.search(r"(https?:)?//[a-z0-9]", text, re.I), path  # no absolute or protocol-relative URL
        assert not re.search(r"@import|fonts\.|analytics|gtag|cdn", text, re.I), path
    html = request(server, "/")[2].decode()
    assert set(re.findall(r'(?:src|href)="([^"]+)"', html)) == {"data:,", "/static/app.css", "/static/app.js"}


def test_upload_explain_and_pictures_over_http(server, model):
    status, s = post_json(server, "/api/upload?name=three%20(1).png", encode(digit(3)))
    assert status == 200 and s["name"] == "three (1).png" and len(s["top"]) == 5
    pictures = []
    for t in (s["top"][0]["target"], s["top"][1]["target"]):
        status, r = get_json(server, f"/api/explain?image={s['id']}&target={t}&variant=vanilla")
        assert status == 200 and r["kind"] == "class" and abs(r["prob"] - next(
            x["prob"] for x in s["top"] if x["target"] == t)) < 1e-9
        status, headers, png = request(server, r["overlay"])
        assert status == 200 and headers["Content-Type"] == "image/png"
        pictures.append(np.asarray(Image.open(io.BytesIO(png))))
        status, headers, raw = request(server, r["raw"])
        assert headers["Content-Disposition"] == f'attachment; filename="three_1_{t[1:]}_vanilla_map.npz"'
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            assert np.allclose(z["map"], oracle(model, model_input(model, digit(3)), int(t[1:])), atol=ATOL)
    assert np.abs(pictures[0].astype(int) - pictures[1].astype(int)).mean() > 1.0
    for path in (r["attention"], r["input"], r["panel"], "/api/example.png?id=chelsea"):
        status, headers, png = request(server, path)
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n", path


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "is empty (0 bytes)"),
    (b"GIF89a but not really", 400, "cannot read 'x.bin'"),
    (b"%PDF-1.4 a document", 400, "not a recognised image format"),
    (bytes(60_000), 413, "the upload is 59 KB, more than the limit of 49 KB; choose a smaller image"),
])
def test_bad_uploads_get_a_message_and_the_server_keeps_serving(server, data, status, words):
    got, body = post_json(server, "/api/upload?name=x.bin", data)
    assert got == status and words in body["error"]
    assert request(server, "/api/info")[0] == 200


def test_unexpected_errors_answer_500_and_the_server_keeps_serving(server, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.engine, "attention_png", broken)
    status, _, body = request(server, "/api/attention.png?image=x")
    assert status == 500 and "internal error (RuntimeError: boom)" in json.loads(body)["error"]
    monkeypatch.undo()
    assert request(server, "/api/info")[0] == 200


@pytest.mark.parametrize("path, status, words", [
    ("/api/explain?image=ffff&target=c1", 404, "no longer in the server's cache"),
    ("/api/overlay.png?image=ffff&target=c1", 404, "upload or pick it again"),
    ("/api/example.png?id=nope", 404, "no example named 'nope'"),
    ("/static/../app.py", 404, "no file '../app.py'"),
    ("/static/secret.txt", 404, "no file 'secret.txt'"),
    ("/admin", 404, "no page '/admin'"),
])
def test_unknown_things_are_json_messages(server, path, status, words):
    got, body = get_json(server, path)
    assert got == status and words in body["error"]


def test_requests_for_another_host_name_are_refused(server):
    status, _, body = request(server, "/api/info", headers={"Host": f"attacker.example:{server.port}"})
    assert status == 403 and "must address 127.0.0.1" in json.loads(body)["error"]


def test_concept_upload_over_http_keeps_binary_bytes_exact(server, model):
    files = [("zero a.png", encode(digit(0))), ("zero b.jpg", encode(digit(10), "JPEG", quality=95))]
    body, ctype = multipart({"name": "zeros"}, files)
    status, info = post_json(server, "/api/concept", body, {"Content-Type": ctype})
    assert status == 200 and info["name"] == "zeros" and info["n_images"] == 2
    direct = DemoEngine(model)
    direct.add_concept("zeros", files)
    got = server.engine._concepts[info["target"][1:]].vector
    assert torch.equal(got, direct._concepts["1"].vector)  # same bytes in, same vector out
    status, s = post_json(server, "/api/upload?name=six.png", encode(digit(6)))
    status, r = get_json(server, f"/api/explain?image={s['id']}&target={info['target']}&variant=vanilla")
    assert status == 200 and r["label"] == "concept: zeros"
    body, ctype = multipart({"name": "none"}, [])
    status, err = post_json(server, "/api/concept", body, {"Content-Type": ctype})
    assert status == 400 and "has no example images" in err["error"]


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope.ckpt"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "not found" in err and "\n" not in err


def test_a_busy_port_is_a_user_error(tiny_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(CdamError, match=f"cannot listen on 127.0.0.1:{port}.*pass --port with another number"):
            make_server(tiny_checkpoint, port, examples=False, quiet=True)

"""explain.py at scale on the tiny digits checkpoint: maps streamed to shards, a run killed with SIGKILL resumes
to exactly the maps of an uninterrupted run, a damaged shard is redone, a folder of another run is refused,
`--devices 2` on CPU gives the maps of one device, float16 storage, and `load_explanations` over the sharded
folders and the single maps.npz of earlier versions."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import explain
from cdam_pl import load_explanations
from cdam_pl.errors import DataError
from cdam_pl.report import explain_to_dir

REPO = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int, corrupt: int | None = None) -> Path:
    """n random 40x40 PNGs img00.png...; image number `corrupt` is a file that is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        path = folder / f"img{k:02d}.png"
        if k == corrupt:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return folder


def run(argv, capsys):
    rc = explain.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def same_record(x, y, exact: bool) -> bool:
    """Manifest entries equal, their numbers to float32 rounding unless exact."""
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same_record(x[k], y[k], exact) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(same_record(a, b, exact) for a, b in zip(x, y))
    if isinstance(x, float) and isinstance(y, float) and not exact:
        return x == pytest.approx(y, rel=1e-5, abs=1e-6)
    return x == y


def assert_same_maps(a: Path, b: Path, exact: bool = True) -> None:
    """The two folders hold the same images with the same maps, targets, logits and manifest entries."""
    ea, eb = load_explanations(a), load_explanations(b)
    assert list(ea) == list(eb) and len(ea) > 0
    for path in ea:
        x, y = ea[path], eb[path]
        assert x.maps.keys() == y.maps.keys() and x.rows == y.rows and same_record(x.record, y.record, exact)
        np.testing.assert_array_equal(x.targets, y.targets)
        for name in x.maps:
            assert x.maps[name].dtype == np.float32
            if exact:
                np.testing.assert_array_equal(x.maps[name], y.maps[name], err_msg=name)
            else:
                np.testing.assert_allclose(x.maps[name], y.maps[name], rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(x.logits, y.logits, rtol=1e-5, atol=1e-6)
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["skipped"] == mb["skipped"] and same_record(ma["images"], mb["images"], exact)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("scale") / "imgs", 7, corrupt=3)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, images, tmp_path_factory):
    """One uninterrupted run in shards of 2: smooth CDAM (seeded per batch) and attention, with panels."""
    out = tmp_path_factory.mktemp("ref") / "o"
    explain_to_dir(tiny_checkpoint, [images], out, methods="smooth,attention", n_samples=4, shard_size=2,
                   batch_size=2, progress=False, warn=lambda m: None)
    return out


ARGS = ["--methods", "smooth,attention", "--n-samples", "4", "--shard-size", "2", "--batch-size", "2", "--quiet"]


def test_maps_are_streamed_to_shards(reference, images):
    maps = reference / "maps"
    index = json.loads((maps / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == [f"shard-{s:05d}.safetensors" for s in range(4)]  # 7 inputs / 2
    assert [len(s["images"]) for s in index["shards"]] == [2, 1, 2, 1]  # input 3 is unreadable; 6 is alone
    assert index["dtype"] == "float32" and index["explained"] == 6 and index["inputs"] == 7
    for s in index["shards"]:
        marker = json.loads((maps / s["marker"]).read_text())
        with safe_open(str(maps / s["file"]), framework="numpy") as f:
            keys = set(f.keys())
            assert f.get_tensor(f"{s['images'][0][0]}/smooth").dtype == np.float32
        assert keys == {f"{i}/{k}" for i, _ in s["images"] for k in ("smooth", "attention", "logits", "targets")}
        assert [r["index"] for r in marker["images"]] == [i for i, _ in s["images"]]
    manifest = json.loads((reference / "manifest.json").read_text())
    assert [r["index"] for r in manifest["images"]] == [0, 1, 2, 4, 5, 6]
    assert manifest["skipped"][0]["index"] == 3 and manifest["maps"]["index"] == "maps/index.json"
    assert not (reference / "maps.npz").exists()
    ex = load_explanations(reference)
    assert list(ex) == [r["path"] for r in manifest["images"]] and ex.dtype == "float32"
    html = (reference / "index.html").read_text()
    assert all(r["panel"] in html for r in manifest["images"]) and 'href="maps/index.json"' in html


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tiny_checkpoint, tmp_path, capsys):
    images = make_images(tmp_path / "imgs", 16, corrupt=5)  # 8 shards: a wide window to kill the run in
    reference = tmp_path / "ref"
    assert run([tiny_checkpoint, images, "--out", reference, *ARGS], capsys)[0] == 0
    out = tmp_path / "o"
    argv = [str(tiny_checkpoint), str(images), "--out", str(out), *ARGS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "explain.py"), *argv], env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (out / "maps" / "shard-00000.json").exists():  # the first shard is written: kill the run
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first shard"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "maps" / "index.json").exists() and not (out / "manifest.json").exists()  # killed mid-run
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    line = [ln for ln in err.splitlines() if ln.startswith("resuming:")]
    done = re.fullmatch(r"resuming: (\d+) of 16 images already explained", line[0]) if len(line) == 1 else None
    assert done and 2 <= int(done.group(1)) <= 13, err  # at least the first shard, not all 15 readable images
    assert_same_maps(out, reference)
    panels = [sorted(p.name for p in (d / "panels").iterdir()) for d in (out, reference)]
    assert panels[0] == panels[1]
    assert not list((out / "maps").glob(".*.tmp"))


def test_a_damaged_shard_is_redone_and_the_others_kept(tiny_checkpoint, images, reference, tmp_path, capsys):
    out = tmp_path / "o"
    argv = [tiny_checkpoint, images, "--out", out, *ARGS]
    assert run(argv, capsys)[0] == 0
    maps = out / "maps"
    last = maps / "shard-00003.safetensors"
    with open(last, "r+b") as f:  # the last shard cut short
        f.truncate(last.stat().st_size - 8)
    (maps / "shard-00001.json").unlink()  # killed between a shard's tensors and its marker
    (maps / ".shard-00002.safetensors.x1y2.tmp").write_bytes(b"half a shard")  # killed while writing
    kept = {s: (maps / f"shard-{s:05d}.safetensors").stat().st_mtime_ns for s in (0, 2)}
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    assert "resuming: 4 of 7 images already explained" in err  # shards 0 and 2 hold 2 + 2 images
    assert {s: (maps / f"shard-{s:05d}.safetensors").stat().st_mtime_ns for s in (0, 2)} == kept
    assert not list(maps.glob(".*.tmp"))
    assert_same_maps(out, reference)
    rc, _, err = run(argv, capsys)  # a finished run: nothing left to do, the files are rewritten the same
    assert rc == 0 and "resuming: 6 of 7 images already explained" in err
    assert_same_maps(out, reference)


def test_a_run_with_other_settings_is_refused(tiny_checkpoint, images, tmp_path, capsys):
    out = tmp_path / "o"
    argv = [tiny_checkpoint, images, "--out", out, "--methods", "cdam", "--shard-size", "4", "--quiet"]
    rc, _, err = run(argv, capsys)
    assert rc == 0 and "resuming" not in err  # a fresh folder: nothing to say
    before = {p: p.read_bytes() for p in sorted((out / "maps").iterdir())}
    other = tmp_path / "other.ckpt"
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    head = next(k for k in ckpt["state_dict"] if k.startswith("head."))
    ckpt["state_dict"][head] = ckpt["state_dict"][head] + 1
    torch.save(ckpt, other)
    cases = [([tiny_checkpoint, images, "--out", out, "--methods", "cdam,attention"], "methods"),
             ([tiny_checkpoint, images, "--out", out, "--targets", "top2"], "targets"),
             ([tiny_checkpoint, images, "--out", out, "--dtype", "float16"], "dtype"),
             ([other, images, "--out", out], "checkpoint"),
             ([tiny_checkpoint, images / "img00.png", "--out", out], "input images")]
    for args, what in cases:
        rc, _, err = run([*args, "--shard-size", "4", "--quiet", *(["--methods", "cdam"] if what != "methods" else [])],
                         capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, err
        assert re.match(rf"error: {re.escape(str(out))} holds an earlier run with other {what} \(.* then, .* now\); "
                        r"run the same command to resume it, or choose another output folder$", lines[0]), lines[0]
    assert {p: p.read_bytes() for p in sorted((out / "maps").iterdir())} == before  # nothing was mixed in


def test_devices_2_on_cpu_equals_one_device(tiny_checkpoint, images, reference, tmp_path):
    summary = explain_to_dir(tiny_checkpoint, [images], tmp_path / "o", methods="smooth,attention", n_samples=4,
                             shard_size=2, batch_size=2, devices=2, accelerator="cpu", progress=False)
    assert summary.explained == 6 and len(summary.skipped) == 1
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["device"] == "cpu x 2 (Lightning ddp_spawn)"
    assert_same_maps(tmp_path / "o", reference, exact=False)
    assert sorted(p.name for p in (tmp_path / "o" / "panels").iterdir()) == \
        sorted(p.name for p in (reference / "panels").iterdir())


def test_float16_storage_is_recorded_and_read_back_as_float32(tiny_checkpoint, images, reference, tmp_path):
    explain_to_dir(tiny_checkpoint, [images], tmp_path / "o", methods="smooth,attention", n_samples=4, shard_size=2,
                   batch_size=2, dtype="float16", panels=False, progress=False, warn=lambda m: None)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["maps"]["dtype"] == "float16"
    half, full = load_explanations(tmp_path / "o"), load_explanations(reference)
    assert half.dtype == "float16" and list(half) == list(full)
    with safe_open(str(tmp_path / "o" / "maps" / "shard-00000.safetensors"), framework="numpy") as f:
        assert f.get_tensor("0/smooth").dtype == np.float16 and f.get_tensor("0/logits").dtype == np.float32
    for path in full:
        for name, m in full[path].maps.items():
            got = half[path].maps[name]
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, m.astype(np.float16).astype(np.float32))


def test_load_explanations_reads_an_old_maps_npz(reference, tmp_path):
    """A folder of an earlier version (one maps.npz in its layout, manifest.json) reads like a sharded one."""
    new = load_explanations(reference)
    arrays = {"images": np.array(list(new)), "index": np.array([new[p].index for p in new], dtype=np.int64),
              "classes": np.array(new.classes), "concepts": np.array(new.concepts, dtype=str),
              "methods": np.array(new.methods)}
    for p in new:
        e, i = new[p], new[p].index
        arrays.update({f"{i}/logits": e.logits, f"{i}/targets": e.targets})
        for name, m in e.maps.items():
            arrays[f"{i}/{name}"], arrays[f"{i}/{name}/rows"] = m, np.array(e.rows[name])
    old = tmp_path / "old"
    old.mkdir()
    np.savez(old / "maps.npz", **arrays)
    (old / "manifest.json").write_text((reference / "manifest.json").read_text())
    ex = load_explanations(old)
    assert ex.format == "maps.npz" and list(ex) == list(new) and ex.methods == new.methods
    for p in new:
        a, b = ex[p], new[p]
        assert a.index == b.index and a.rows == b.rows and a.record == b.record and a.concept_scores is None
        assert a.target_names == b.target_names
        for name in b.maps:
            np.testing.assert_array_equal(a.maps[name], b.maps[name])


def test_load_explanations_errors_are_one_line(tiny_checkpoint, images, tmp_path):
    with pytest.raises(DataError, match=r"holds no explanations \(neither maps/index.json nor maps.npz\)"):
        load_explanations(tmp_path)
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "run.json").write_text("{}")
    with pytest.raises(DataError, match="holds an unfinished explain run .*run the same command again to finish it"):
        load_explanations(tmp_path)


def test_float16_refuses_scores_beyond_its_range(tiny_checkpoint, images, tmp_path, capsys):
    from cdam_pl.explain import registry

    @registry.register_method("huge")
    def huge(backbone, head, images, targets):
        """Toy: 1e6 everywhere, beyond float16's largest finite value (65504)."""
        gh, gw = images.shape[2] // backbone.patch_size, images.shape[3] // backbone.patch_size
        return torch.full((images.shape[0], targets.shape[1], gh, gw), 1e6)

    try:
        rc, _, err = run([tiny_checkpoint, images / "img00.png", "--methods", "huge", "--dtype", "float16",
                          "--out", tmp_path / "o", "--quiet"], capsys)
    finally:
        registry.unregister_method("huge")
    assert rc == 2 and err.strip() == "error: method 'huge' has scores up to 1e+06, beyond float16's range; use " \
                                      "--dtype float32"


@pytest.mark.parametrize("args, pattern", [
    (["--device", "cpu", "--devices", "2"], r"--device cpu runs on one device; for several use --devices N with "
                                            r"--accelerator, not both"),
    (["--devices", "0"], r"--devices must be >= 1, got 0"),
    (["--shard-size", "1025"], r"--shard-size must be between 1 and 1024, got 1025"),
    pytest.param(["--accelerator", "gpu"], r"--accelerator gpu --devices 1: .*; check the devices this machine has",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")),
])
def test_device_options_are_checked_before_anything_is_written(args, pattern, tiny_checkpoint, images, tmp_path,
                                                               capsys):
    rc, _, err = run([tiny_checkpoint, images, "--out", tmp_path / "o", *args], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and re.match(rf"error: {pattern}", lines[0]), err
    assert not (tmp_path / "o").exists()

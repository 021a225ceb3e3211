"""Nothing is lost and nothing untrusted runs: graceful stop and exact resume (in-process, train.py, DDP), atomic
writes of checkpoints, cache and explain.py outputs, cache damage rebuilt, and checkpoints that would run code
when unpickled refused everywhere a checkpoint is read."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from cdam_pl.checkpoint import load_checkpoint, read_checkpoint
from cdam_pl.errors import CdamError, CheckpointError
from cdam_pl.features.cache import FeatureCache
from cdam_pl.train.atomic import AtomicCheckpointIO
from cdam_pl.train.run import run_training
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS = 13, 3  # 400 training samples in batches of 32
SMALL = ("cache.enabled=true", "data.batch_size=32", "data.train_size=400", "data.val_size=100",
         f"trainer.max_epochs={EPOCHS}")


def _train(out, *overrides, callbacks=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_training(tiny_config(out, *overrides), extra_callbacks=callbacks)


def _same_head(a, b) -> bool:
    pa, pb = list(a.head.parameters()), list(b.head.parameters())
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))


class SignalAt(Callback):
    """Sends `signum` to this process while the batch after `step` optimizer steps runs (as a scheduler would)."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class CopyLastAtEpochStart(Callback):
    """Keeps a copy of last.ckpt as it was when epoch `epoch` started (an end-of-epoch checkpoint)."""

    def __init__(self, epoch: int, dest: Path):
        self.epoch, self.dest = epoch, dest

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            shutil.copy(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt", self.dest)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One feature cache for the module: the digits subset is extracted once."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted run, plus a copy of its last.ckpt from the end of epoch 1."""
    out = tmp_path_factory.mktemp("reference")
    copy = out / "end_of_epoch_1.ckpt"
    result = _train(out, *SMALL, f"cache.dir={cache_dir}", callbacks=[CopyLastAtEpochStart(2, copy)])
    assert result["stopped"] is None and result["trainer"].global_step == STEPS_PER_EPOCH * EPOCHS
    return result, copy


# --------------------------------------------------------------------------------------------- stop and resume


@pytest.mark.parametrize("signum, step", [(signal.SIGTERM, 17), (signal.SIGINT, 12)],
                         ids=["sigterm-mid-epoch", "ctrl-c-last-batch-of-epoch"])
def test_stop_saves_last_checkpoint_and_resume_equals_uninterrupted_run(reference, cache_dir, tmp_path, signum,
                                                                        step):
    ref, _ = reference
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stopped = _train(tmp_path, *SMALL, f"cache.dir={cache_dir}", callbacks=[SignalAt(step, signum)])

    # The batch in flight finishes, then last.ckpt is saved and the run returns with a one-line message.
    done, epoch = step + 1, step // STEPS_PER_EPOCH  # the batch after `step` steps is batch `step` (0-based)
    name = signal.Signals(signum).name
    info = stopped["stopped"]
    assert (info["signal"], info["epoch"], info["step"], info["exit_code"]) == (name, epoch, done, 128 + signum)
    assert re.fullmatch(rf"stopped by {name} at epoch {epoch} step {done}; saved .*last\.ckpt; "
                        r"resume with resume=last", info["message"])
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # previous handlers are back
    ckpt = read_checkpoint(info["checkpoint"])  # a valid, safely readable checkpoint
    assert ckpt["global_step"] == done
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": epoch, "batches": done - epoch * STEPS_PER_EPOCH}]  # the batches of the epoch already trained on

    resumed = _train(tmp_path, *SMALL, f"cache.dir={cache_dir}", "resume=last")
    assert resumed["stopped"] is None
    assert resumed["trainer"].global_step == STEPS_PER_EPOCH * EPOCHS
    assert _same_head(resumed["module"], ref["module"])  # bitwise equal to the uninterrupted run
    assert resumed["metrics"]["val/acc"] == ref["metrics"]["val/acc"]
    assert Path(resumed["run_dir"]) == Path(stopped["run_dir"])  # logging continues in the interrupted run's folder


class SignalTwiceAt(SignalAt):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
            os.kill(os.getpid(), self.signum)


def test_second_ctrl_c_aborts_at_once_without_saving(cache_dir, tmp_path):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(SystemExit) as e:  # Lightning turns the KeyboardInterrupt into exit status 1
        _train(tmp_path, *SMALL, f"cache.dir={cache_dir}", callbacks=[SignalTwiceAt(3, signal.SIGINT)])
    assert e.value.code == 1
    assert not list(tmp_path.rglob("*.ckpt"))  # no checkpoint yet in epoch 0, and none written on the way out
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_failed_save_on_stop_is_one_line(cache_dir, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cdam_pl.io.atomic_torch_save", disk_full)
    with pytest.raises(CheckpointError, match=r"^stopping on SIGTERM: could not save .*last\.ckpt \(No space left on "
                                              r"device\); the previous last\.ckpt, if any, is intact; free space"):
        _train(tmp_path, *SMALL, f"cache.dir={cache_dir}", callbacks=[SignalAt(3, signal.SIGTERM)])


def test_sigterm_during_feature_extraction_keeps_finished_shards_and_the_rerun_resumes(tmp_path, monkeypatch):
    """Before training there is nothing to save: a SIGTERM stops at once with one line; the shards already written
    stay, and the next run extracts only the rest (Lightning alone would note the signal and carry on)."""
    import cdam_pl.features.extract as extract
    from cdam_pl.train.run import build_backbone, build_datamodule

    monkeypatch.setattr(extract, "extract_features", functools.partial(extract.extract_features, shard_size=64))
    seen: list[int] = []
    kill_at = [5]  # batch 5 of 32 samples: shards 0 and 1 (samples 0-127) are written by then
    real = extract.FeatureExtraction.predict_step

    def step(self, batch, batch_idx):
        if len(seen) // 32 + 1 == kill_at[0]:
            os.kill(os.getpid(), signal.SIGTERM)
        seen.extend(batch[0].tolist())
        return real(self, batch, batch_idx)

    monkeypatch.setattr(extract.FeatureExtraction, "predict_step", step)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    first = _train(tmp_path, *SMALL)
    assert first["stopped"]["message"] == ("stopped by SIGTERM during feature extraction; nothing new to save "
                                           "(finished feature-cache shards are kept); run the same command again")
    assert first["stopped"]["exit_code"] == 143 and first["trainer"].global_step == 0
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert seen == list(range(128))
    (directory,) = [d for d in (tmp_path / "cache").iterdir()]
    assert sorted(p.name for p in directory.glob("shard_*.json")) == ["shard_00000.json", "shard_00001.json"]
    assert not (directory / "header.json").exists() and not list(directory.glob("*.tmp"))

    seen.clear()
    kill_at[0] = -1
    second = _train(tmp_path, *SMALL, "trainer.max_epochs=1")
    assert second["stopped"] is None and second["trainer"].global_step == STEPS_PER_EPOCH
    assert seen[:272] == list(range(128, 400)) and seen[272:] == list(range(100))  # rest of train, then all val
    cfg = tiny_config(tmp_path, *SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = build_backbone(cfg)
        data = build_datamodule(cfg, backbone)
        data.setup()
    cache = FeatureCache.load(tmp_path / "cache", json.loads((directory / "header.json").read_text())["key"])
    images = torch.stack([data.train_dataset[i][0] for i in range(400)])
    with torch.no_grad():
        direct = torch.cat([backbone(images[i:i + 32]) for i in range(0, 400, 32)])  # [400, 64]
    torch.testing.assert_close(cache.features(slice(None)), direct, rtol=1e-5, atol=1e-5)


def test_resume_from_end_of_epoch_checkpoint_equals_uninterrupted_run(reference, cache_dir, tmp_path):
    ref, copy = reference
    assert torch.load(copy, weights_only=True)["epoch"] == 1  # saved when epoch 1 ended
    resumed = _train(tmp_path, *SMALL, f"cache.dir={cache_dir}", f"resume={copy}")
    assert resumed["trainer"].global_step == STEPS_PER_EPOCH * EPOCHS
    assert _same_head(resumed["module"], ref["module"])


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"{path} never appeared (exit {proc.returncode}): {err[-2000:]}")
        time.sleep(0.02)


CLI_EPOCHS = 6


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory, cache_dir):
    overrides = (*SMALL, f"trainer.max_epochs={CLI_EPOCHS}", f"cache.dir={cache_dir}")
    return overrides, _train(tmp_path_factory.mktemp("cli_reference"), *overrides)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_train_py_stopped_from_outside_exits_with_one_line_and_resumes_exactly(cli_reference, tmp_path, signum):
    """A real signal from another process at an arbitrary moment after the first epoch: train.py saves, prints one
    line, exits 128 + signal; resuming gives the uninterrupted run's head."""
    overrides, reference = cli_reference
    out = tmp_path
    argv = train_argv(out, overrides)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    _wait_for(out / "tiny" / "version_0" / "checkpoints" / "last.ckpt", proc, timeout=240)  # epoch 0 is done
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(rf"stopped by {name} at epoch (\d+) step (\d+); saved (.*last\.ckpt); resume with resume=last",
                     last)
    assert m and err.count("stopped by") == 1, err[-2000:]
    total = STEPS_PER_EPOCH * CLI_EPOCHS
    assert 1 <= int(m.group(1)) < CLI_EPOCHS and STEPS_PER_EPOCH < int(m.group(2)) < total
    assert read_checkpoint(m.group(3))["global_step"] == int(m.group(2))

    resumed = _train(out, *overrides, "resume=last")
    assert resumed["trainer"].global_step == reference["trainer"].global_step == total
    assert _same_head(resumed["module"], reference["module"])


def train_argv(out, overrides) -> list[str]:
    """train.py arguments equal to `tiny_config(out, *overrides)`."""
    from omegaconf import OmegaConf

    cfg = tiny_config(out, *overrides)
    flat = []

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                walk(v, key + ".")
            elif not isinstance(v, dict):
                flat.append(f"{key}={'null' if v is None else json.dumps(v) if isinstance(v, (list, bool)) else v}")

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


# --------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import functools, json, os, signal, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
from lightning.pytorch.callbacks import Callback
import cdam_pl.features.extract as extract
import cdam_pl.train.run as training
import train

OUT, KILL_STEP = sys.argv[1], int(sys.argv[2])
# 64-sample shards, so both splits have several shards to share out between the ranks
extract.extract_features = functools.partial(extract.extract_features, shard_size=64)
real_step = extract.FeatureExtraction.predict_step


def recording_step(self, batch, batch_idx):  # which samples each rank extracts
    with open(os.path.join(OUT, f"extracted_rank{{self.trainer.global_rank}}.txt"), "a") as f:
        f.write(f"{{len(self.trainer.datamodule.dataset)}} " + " ".join(map(str, batch[0].tolist())) + "\\n")
    return real_step(self, batch, batch_idx)


extract.FeatureExtraction.predict_step = recording_step


class Kill(Callback):  # SIGTERM to rank 0 only, as a scheduler signalling the launching process
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_rank == 0 and trainer.global_step == KILL_STEP:
            os.kill(os.getpid(), signal.SIGTERM)


class Report(Callback):  # what each rank ends with
    def on_fit_end(self, trainer, module):
        with open(os.path.join(OUT, f"result_rank{{trainer.global_rank}}.json"), "w") as f:
            metrics = {{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}
            json.dump({{"rank": trainer.global_rank, "step": trainer.global_step, "metrics": metrics}}, f)


training.run_training = functools.partial(training.run_training, extra_callbacks=[Kill(), Report()])
if __name__ == "__main__":
    sys.exit(train.main(sys.argv[3:]))
"""


def test_ddp_two_cpu_ranks_split_extraction_stop_together_and_resume(tmp_path):
    """train.py with trainer.strategy=ddp trainer.devices=2 on CPU (gloo): the ranks extract disjoint shards that
    cover every sample once; a SIGTERM to rank 0 mid-epoch stops both ranks after the same step with one saved
    last.ckpt and one message; resuming finishes with both ranks agreeing, one checkpoint folder, rank-0 logs only."""
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT))))
    out = tmp_path / "out"
    out.mkdir()
    args = train_argv(out, ("cache.enabled=true", "data.batch_size=32", "data.train_size=300", "data.val_size=100",
                       "trainer.max_epochs=2", "trainer.devices=2", "trainer.strategy=ddp", f"cache.dir={out}/cache"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)

    # 300 samples / 32 = 10 batches, 5 per rank: steps 0-4 are epoch 0; SIGTERM arrives in step 7 (epoch 1)
    first = run([sys.executable, str(script), str(out), "7", *args])
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    msg = [ln for ln in first.stderr.splitlines() if ln.startswith("stopped by")]
    assert len(msg) == 1 and re.fullmatch(r"stopped by SIGTERM at epoch 1 step 8; saved .*/version_0/checkpoints/"
                                          r"last\.ckpt; resume with resume=last", msg[0]), first.stderr[-3000:]
    assert "Traceback" not in first.stderr and not list(out.glob("result_rank*.json"))
    ckpt = read_checkpoint(out / "tiny" / "version_0" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 8
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 3}]

    # extraction: each split's samples extracted exactly once, each 64-sample shard by a single rank
    seen: dict[int, dict[int, list[int]]] = {}  # split size -> rank -> sample indices
    for rank in (0, 1):
        for line in (out / f"extracted_rank{rank}.txt").read_text().splitlines():
            n, *idx = map(int, line.split())
            seen.setdefault(n, {}).setdefault(rank, []).extend(idx)
    assert sorted(seen) == [100, 300]
    for n, by_rank in seen.items():
        everything = sorted(i for idx in by_rank.values() for i in idx)
        assert everything == list(range(n))  # no sample twice, none missing
        for rank, idx in by_rank.items():
            assert {i // 64 % 2 for i in idx} == {rank}  # rank r extracts shards s with s % 2 == r
    for header in (out / "cache").glob("*/header.json"):
        h = json.loads(header.read_text())
        assert FeatureCache.load(out / "cache", h["key"], verify=True) is not None  # every checksum holds
    assert not list((out / "cache").rglob("*.tmp"))  # no temp file left behind by either rank

    second = run([sys.executable, str(script), str(out), "-1", *args, "resume=last"])
    assert second.returncode == 0, second.stderr[-3000:]
    results = [json.loads((out / f"result_rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["step"] == 10 for r in results) and results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["metrics"]["val/acc"] > 0
    assert [p.name for p in (out / "tiny").iterdir()] == ["version_0"]  # one run folder, resumed in place
    ckpts = sorted(p.name for p in (out / "tiny" / "version_0" / "checkpoints").iterdir())
    assert ckpts == ["best-01.ckpt", "last.ckpt"] or ckpts == ["best-00.ckpt", "last.ckpt"]
    assert read_checkpoint(out / "tiny" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 10
    events = list((out / "tiny" / "version_0").glob("events.out.tfevents.*"))
    assert len(events) == 2  # one TensorBoard file per launch, written by rank 0 only


# --------------------------------------------------------------------------------------------- atomic writes


@pytest.fixture
def replaced(monkeypatch):
    """Records the destination of every os.replace (the rename step of an atomic write)."""
    targets: set[Path] = set()
    real = os.replace

    def spy(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        targets.add(Path(dst).resolve())

    monkeypatch.setattr(os, "replace", spy)
    return targets


def _files(folder: Path) -> set[Path]:
    return {p.resolve() for p in Path(folder).rglob("*") if p.is_file()}


def test_checkpoints_config_and_feature_cache_are_written_by_rename(tmp_path, replaced):
    result = _train(tmp_path, *SMALL, "trainer.max_epochs=1")
    run_dir = Path(result["run_dir"])
    written = (_files(run_dir / "checkpoints") | {(run_dir / n).resolve() for n in ("config.yaml", "hparams.yaml")}
               | _files(tmp_path / "cache"))
    assert {p.name for p in written} >= {"last.ckpt", "config.yaml", "hparams.yaml", "header.json",
                                         "shard_00000.npy", "shard_00000.labels.npy", "shard_00000.json"}
    assert written <= replaced  # every file appeared whole, by rename of a finished temp file
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_explain_outputs_are_written_by_rename(tiny_checkpoint, tmp_path, replaced, capsys):
    import explain

    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"im{k}.png")
    out = tmp_path / "explained"
    assert explain.main([tiny_checkpoint, str(tmp_path), "--out", str(out), "--quiet"]) == 0
    written = _files(out)
    assert {p.name for p in written} >= {"shard-00000.safetensors", "shard-00000.json", "index.json", "run.json",
                                         "manifest.json", "index.html"}
    assert len([p for p in written if p.parent.name == "panels"]) == 3
    assert written <= replaced


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """A write that fails half-way (disk full, killed) leaves the old checkpoint byte for byte, and no temp file."""
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": torch.tensor(2), "big": torch.zeros(10_000)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_failed_hparams_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """TensorBoard's hparams.yaml: a writer that dies half-way leaves no hparams.yaml and no temp file."""
    import lightning.pytorch.core.saving as saving

    from cdam_pl.train.atomic import AtomicTensorBoardLogger

    logger = AtomicTensorBoardLogger(save_dir=tmp_path, name="run", version=0)
    logger.log_hyperparams({"lr": 0.1, "head": "linear"})

    def killed(path, hparams, use_omegaconf=True):
        Path(path).write_text("lr: 0.")  # half a file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(saving, "save_hparams_to_yaml", killed)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    run_dir = Path(logger.log_dir)
    assert not (run_dir / "hparams.yaml").exists() and not list(run_dir.glob("*.tmp"))
    monkeypatch.undo()
    logger.save()
    assert saving.load_hparams_from_yaml(str(run_dir / "hparams.yaml")) == {"lr": 0.1, "head": "linear"}
    logger.experiment.close()


def _train_split_cache(cache: Path) -> tuple[Path, dict]:
    headers = [json.loads(p.read_text()) for p in cache.glob("*/header.json")]
    h = max(headers, key=lambda h: h["n"])  # the training split (400) rather than val (100)
    return cache / h["key"][:16], h


@pytest.mark.parametrize("damage", ["truncate", "flip-byte"])
def test_damaged_cache_shard_is_detected_and_rebuilt_by_training(tmp_path, monkeypatch, damage):
    from cdam_pl.features.extract import FeatureExtraction

    first = _train(tmp_path, *SMALL, "trainer.max_epochs=1")
    directory, header = _train_split_cache(tmp_path / "cache")
    # the header records format version, shape, dtype and each file's size and sha256
    assert (header["version"], header["n"], header["dim"], header["dtype"]) == (1, 400, 64, "float32")
    shard = directory / header["shards"][0]["features"]["file"]
    assert header["shards"][0]["features"]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))  # e.g. a copy cut short
    else:
        data[-5] ^= 0xFF  # same size, one feature changed: only the checksum can tell
        shard.write_bytes(bytes(data))

    extracted = []
    real = FeatureExtraction.predict_step
    monkeypatch.setattr(FeatureExtraction, "predict_step",
                        lambda self, batch, i: extracted.append(len(batch[0])) or real(self, batch, i))
    with pytest.warns(UserWarning, match=r"feature cache .* is damaged \(shard 0: features "
                                         + ("size mismatch" if damage == "truncate" else "checksum mismatch")):
        second = run_training(tiny_config(tmp_path, *SMALL, "trainer.max_epochs=1"))
    assert sum(extracted) == 400  # the damaged training split is extracted again; the intact val split is reused
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == header["shards"][0]["features"]["sha256"]
    assert _same_head(first["module"], second["module"])


# --------------------------------------------------------------------------------------------- unsafe checkpoints


class _Payload:
    """Unpickling this object runs `exec(code)`: the classic malicious-pickle payload."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.fixture
def evil(tiny_checkpoint, tmp_path):
    """Checkpoints that create `marker` when unpickled: a real checkpoint with a payload inside, and a bare pickle."""
    marker = tmp_path / "marker"
    payload = _Payload(f"open({str(marker)!r}, 'w').write('pwned')")
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    ckpt["cdam_pl"]["config"]["note"] = payload  # hidden deep inside an otherwise valid checkpoint
    inside = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    inside.parent.mkdir(parents=True)
    torch.save(ckpt, inside)
    bare = tmp_path / "bare.ckpt"
    bare.write_bytes(pickle.dumps({"cdam_pl": payload, "state_dict": {}}, protocol=2))
    # the payload is real: plain pickle.load would run it
    pickle.loads(bare.read_bytes())
    assert marker.read_text() == "pwned"
    marker.unlink()
    return {"inside": inside, "bare": bare, "marker": marker}


REFUSED = r"^refusing to load .*: it contains objects other than tensors and plain containers .*only load " \
          r"checkpoints you trust"


@pytest.mark.parametrize("which", ["inside", "bare"])
def test_checkpoint_that_runs_code_is_refused_everywhere(evil, which, tmp_path, capsys):
    import explain

    path, marker = evil[which], evil["marker"]
    for load in (read_checkpoint, load_checkpoint, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match=REFUSED) as e:
            load(path)
        assert "\n" not in str(e.value)
    Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    rc = explain.main([str(path), str(tmp_path / "image.png"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and re.match("error: " + REFUSED[1:], err[0])
    with pytest.raises(CheckpointError, match=REFUSED):  # resuming reads it first, before any other work
        _train(tmp_path, *SMALL, f"resume={path}")
    assert not marker.exists()


def test_backbone_weights_file_that_runs_code_is_refused(tmp_path):
    from cdam_pl.backbone import load_backbone

    marker = tmp_path / "marker"
    weights = tmp_path / "weights.pth"
    torch.save({"pos_embed": torch.zeros(1), "x": _Payload(f"open({str(marker)!r}, 'w')")}, weights)
    with pytest.raises(CdamError, match=r"could not load weights for .* from .*weights\.pth: .*weights_only"):
        load_backbone("vit_small_patch16_224.dino", weights=str(weights), img_size=32, depth=2, embed_dim=64,
                      num_heads=4)
    assert not marker.exists()

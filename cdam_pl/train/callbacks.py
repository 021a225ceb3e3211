"""`ExplanationCallback`: watch, epoch by epoch beside the accuracy curves, which evidence a head learns to use.

It tracks a fixed set of validation images (stratified by class, seeded: the same images every epoch) and logs, for
each of them, from ONE batched `CDAM.explain` call per logging step:
- class maps (CDAM) of the true class, the predicted class and the top-k classes (so a mistake shows what drove it);
- concept maps of every configured concept (`explain.concepts`: name -> folder of example images) and, with
  `explain.class_mean_concepts`, of the training-set class mean of the image's true class;
- the class-agnostic attention map (last block, CLS query, mean of heads), for comparison.

TensorBoard images have stable tags, one per tracked image and map kind: `explain/img00/classes`,
`explain/img00/concepts`, `explain/img00/attention`. Scalars per logging step: `explain/compactness`,
`explain/class_sensitivity`, `explain/faithfulness` (+ `explain/deletion_drop_top`, `explain/deletion_drop_random`);
histograms `explain/scores_predicted` and `explain/faithfulness_per_image`. At the end of fitting one PNG strip per
tracked image (maps across the logged epochs) goes to `<log_dir>/explanations/`.

Step convention: step = number of training epochs completed. Step 0 is the untrained head, logged in
`on_train_start` (before the first training epoch); the validation at the end of epoch e (Lightning's
`current_epoch` = e) logs step e + 1, every `every_n_epochs` steps and after the last epoch (at the end of fitting
when no validation ran after it, e.g. an early stop or no validation set).

Concept and attention maps depend only on the frozen backbone, never on the head: they are logged at every step (so
every tag exists at every step) but are identical across steps, and the strips show them once.

It never changes training: it runs on the global-zero process only and calls nothing that synchronises processes
(no collective inside a rank-zero branch), never draws from the global RNG, restores every module mode it changes
(the engine does too), registers no hooks, and reads images from the datasets directly (no DataLoader, whose
iterator would draw a seed from the global RNG).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from cdam_pl.data.images import list_images, load_image
from cdam_pl.data.splits import stratified_subset
from cdam_pl.errors import CdamError, ConfigError, DataError
from cdam_pl.explain.cdam import CDAM, concept_vectors
from cdam_pl.metrics.compactness import compactness
from cdam_pl.metrics.deletion import deletion_drop, embed_without_tokens
from cdam_pl.metrics.sensitivity import map_correlation
from cdam_pl.viz.figures import panel, strip
from cdam_pl.viz.maps import DISPLAY_Q, overlay, save_png, to_uint8_image

__all__ = ["ExplanationCallback", "Snapshot", "load_concept_images"]


@dataclass
class Snapshot:
    """What one logging step saw, on the CPU. B tracked images, K = 1 + k classes (true, top-1 .. top-k)."""

    step: int
    targets: Tensor  # [B, K] class indices: true class, then the top-k predictions (index 1 = predicted)
    probs: Tensor  # [B, K] softmax probabilities of those classes
    class_maps: Tensor  # [B, K, gh, gw] signed CDAM
    concept_scores: Tensor | None  # [B, M] similarity to each concept vector
    concept_maps: Tensor | None  # [B, M, gh, gw]
    attention: Tensor | None  # [B, gh, gw] CLS attention, mean of heads
    scalars: dict[str, float]
    faithfulness: Tensor  # [B] drop_top - drop_random per image


def load_concept_images(name: str, folder: str, transform) -> Tensor:
    """The example images of one concept as a batch [n, 3, H, W]; a one-line ConfigError naming the concept."""
    try:
        return torch.stack([transform(load_image(f)) for f in list_images(folder)])
    except DataError as e:
        raise ConfigError(f"explain.concepts.{name}: {e}; give a folder with one or more example images") from None


class _RemovedTokenEmbeddings:
    """`embed_without_tokens` for the tracked batch, remembering each image's embedding per removed-token set.

    Exact, not an approximation: the backbone is frozen, so an embedding depends only on the image and the set.
    Only the sets of the latest call are kept (bounded memory); the seeded random sets recur every step and the
    top-CDAM sets recur once the head settles, so most steps need few or no new forwards.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[int, bytes], Tensor] = {}
        self.computed = 0  # sequences actually run (for tests and the benchmark)

    def __call__(self, backbone: nn.Module, images: Tensor, remove: Tensor) -> Tensor:
        b, r, n = remove.shape  # images are the whole tracked batch, in the same order at every call
        flat = remove.reshape(b * r, n)
        keys = [(k // r, flat[k].cpu().numpy().tobytes()) for k in range(b * r)]
        missing = [k for k in range(b * r) if keys[k] not in self._store]
        if missing:
            rows = torch.tensor([k // r for k in missing], device=images.device)
            emb = embed_without_tokens(backbone, images[rows], flat[missing][:, None])[:, 0]  # [m, D]
            self._store.update({keys[k]: e for k, e in zip(missing, emb)})
            self.computed += len(missing)
        out = torch.stack([self._store[key] for key in keys]).view(b, r, -1)  # [B, R, D]
        self._store = {key: self._store[key] for key in keys}
        return out


class ExplanationCallback(L.Callback):
    """Log CDAM class/concept maps, attention maps and explanation-quality scalars of tracked images during fitting.

    images [B, 3, H, W] (eval transform) and labels [B] are the tracked validation images. concepts: name ->
    example images [n, 3, H, W]. class_mean_data: a dataset of (image tensor, label) with `.targets` (the training
    set with the eval transform) for class-mean concepts, or None. The LightningModule must expose `.backbone`
    (a FrozenViT) and `.head`. See the module docstring for what is logged and when.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Sequence[int] | Tensor,
        classes: Sequence[str],
        *,
        ids: Sequence[str] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        every_n_epochs: int = 1,
        top_k: int = 3,
        concepts: Mapping[str, Tensor] | None = None,
        class_mean_data: Any = None,
        max_class_mean_images: int = 2000,
        similarity: str = "dot",
        deletion_fraction: float = 0.1,
        n_random: int = 4,
        seed: int = 0,
        max_strip_columns: int = 10,
    ):
        super().__init__()
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            raise CdamError(f"tracked images must be a non-empty [B, 3, H, W] tensor, got {tuple(images.shape)}")
        for key, value in (("every_n_epochs", every_n_epochs), ("top_k", top_k), ("n_random", n_random),
                           ("max_class_mean_images", max_class_mean_images)):
            if int(value) < 1:
                raise ConfigError(f"explain.{key} must be > 0, got {value}")
        if int(max_strip_columns) < 2:
            raise ConfigError(f"max_strip_columns must be >= 2, got {max_strip_columns}")
        self.images = images.detach().cpu().clone()  # [B, 3, H, W]
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()  # [B]
        if self.labels.shape[0] != self.images.shape[0]:
            raise CdamError(f"got {self.images.shape[0]} tracked images but {self.labels.shape[0]} labels")
        self.classes = [str(c) for c in classes]
        self.ids = list(ids) if ids is not None else [f"image {i}" for i in range(len(self.labels))]
        self.mean, self.std = mean, std
        self.every_n_epochs, self.top_k = int(every_n_epochs), int(top_k)
        self.concept_images = {str(k): v.detach().cpu() for k, v in (concepts or {}).items()}
        self.class_mean_data = class_mean_data
        self.max_class_mean_images = int(max_class_mean_images)
        self.similarity = similarity
        self.deletion_fraction, self.n_random, self.seed = float(deletion_fraction), int(n_random), int(seed)
        self.max_strip_columns = int(max_strip_columns)
        # Filled on the global-zero process when fitting starts.
        self.concept_names: list[str] = []
        self._vectors: Tensor | None = None  # [M, D]: user concepts, then class means
        self._own_mean: Tensor | None = None  # [B]: concept index of each image's class mean, or -1
        self._removed = _RemovedTokenEmbeddings()
        self._vectors_ready = False
        self.class_mean_source: str | None = None  # "feature cache" or "images", once class means are computed
        self.last: Snapshot | None = None
        self.history: list[Snapshot] = []  # thinned to max_strip_columns entries; maps for the strips
        self.strip_paths: list[Path] = []

    # --- construction from the training config ----------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Any, datamodule: Any) -> "ExplanationCallback":
        """Build from `cfg.explain` and the run's ImageDataModule: picks the tracked images (stratified by class,
        seeded with the data seed) and loads the concept folders now, so a bad folder fails before training."""
        if int(cfg.num_images) < 1:
            raise ConfigError(f"explain.num_images must be > 0, got {cfg.num_images}")
        datamodule.setup()
        transform = datamodule.eval_transform
        val = datamodule.val_dataset.with_transform(transform)
        idx = stratified_subset(val.targets, int(cfg.num_images), datamodule.seed)
        images = torch.stack([val[i][0] for i in idx])
        concepts = {str(name): load_concept_images(str(name), str(folder), transform)
                    for name, folder in dict(cfg.concepts or {}).items()}
        class_mean_data = datamodule.train_dataset.with_transform(transform) if cfg.class_mean_concepts else None
        return cls(
            images, [val.targets[i] for i in idx], datamodule.classes, ids=[val.ids[i] for i in idx],
            mean=datamodule.mean, std=datamodule.std, every_n_epochs=cfg.every_n_epochs, top_k=cfg.top_k,
            concepts=concepts, class_mean_data=class_mean_data, max_class_mean_images=cfg.max_class_mean_images,
            similarity=cfg.similarity, seed=datamodule.seed,
        )

    # --- Lightning hooks ----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._prepare(trainer, pl_module)
        if trainer.current_epoch == 0:  # a fresh run: the untrained head is the baseline (a resumed run has none)
            self._log(trainer, pl_module, step=0)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if not self._ends_epoch(trainer):
            return  # a mid-epoch validation (val_check_interval < 1): the epoch's head is not final yet
        step = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and step >= trainer.max_epochs
        if (step % self.every_n_epochs == 0 or last) and (self.last is None or self.last.step != step):
            self._log(trainer, pl_module, step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the final head if no validation did (early stop, no validation set), then write the strips."""
        if not trainer.is_global_zero:
            return
        done = trainer.current_epoch  # epochs completed
        if self._vectors_ready and done > 0 and (self.last is None or self.last.step < done):
            self._log(trainer, pl_module, done)
        if self.history:
            self.write_strips(self._out_dir(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """An interrupted run (Ctrl-C, a crash) still gets the strips of what was logged."""
        if trainer.is_global_zero and self.history:
            try:
                self.write_strips(self._out_dir(trainer))
            except Exception as e:  # never mask the original error
                warnings.warn(f"could not write explanation strips: {e}", stacklevel=1)

    # --- the work -----------------------------------------------------------------------------------------------
    @staticmethod
    def _parts(pl_module: L.LightningModule) -> tuple[nn.Module, nn.Module]:
        backbone, head = getattr(pl_module, "backbone", None), getattr(pl_module, "head", None)
        if backbone is None or head is None:
            raise CdamError("ExplanationCallback needs a LightningModule with .backbone (FrozenViT) and .head")
        return backbone, head

    @staticmethod
    def _ends_epoch(trainer: L.Trainer) -> bool:
        """Whether this validation ran after the last training batch of the epoch (Lightning's own criterion)."""
        try:
            progress = trainer.fit_loop.epoch_loop.batch_progress
            return progress.current.ready >= trainer.num_training_batches or bool(progress.is_last_batch)
        except AttributeError:  # another Lightning version: log every validation (one per step, see on_validation_end)
            return True

    @torch.no_grad()
    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Concept vectors (user concepts, then class means), computed once when fitting starts."""
        backbone, _ = self._parts(pl_module)
        param = next(backbone.parameters())
        names: list[str] = []
        vectors: list[Tensor] = []
        if self.concept_images:
            examples = {k: x.to(param.device, param.dtype) for k, x in self.concept_images.items()}
            n, v = concept_vectors(backbone, examples)
            names += n
            vectors.append(v)
        own = torch.full_like(self.labels, -1)
        if self.class_mean_data is not None:
            classes, means = self._class_means(trainer, backbone)
            for c in classes:
                own[self.labels == c] = len(names)
                names.append(f"mean({self.classes[c]})")
            vectors.append(means.to(param.device))
        self.concept_names = names
        self._vectors = torch.cat([v.float() for v in vectors]) if vectors else None
        self._own_mean = own
        self._vectors_ready = True

    def _class_means(self, trainer: L.Trainer, backbone: nn.Module) -> tuple[list[int], Tensor]:
        """Training-set mean embedding of each tracked image's true class, from up to max_class_mean_images images
        (stratified, seeded; eval transform). Read from the run's feature cache when the trainer trains on it."""
        data = self.class_mean_data
        targets = np.asarray(data.targets, dtype=np.int64)
        classes = sorted(set(self.labels.tolist()))
        pool = np.flatnonzero(np.isin(targets, classes))
        missing = sorted(set(classes) - set(targets[pool].tolist()))
        if missing:
            raise DataError(f"class-mean concepts: no training images of class {self.classes[missing[0]]!r}")
        pick = pool[stratified_subset(targets[pool], self.max_class_mean_images, self.seed)]
        feats = self._cached_features(trainer, pick, targets)
        self.class_mean_source = "images" if feats is None else "feature cache"
        if feats is None:
            param = next(backbone.parameters())
            chunks = []
            for s in range(0, len(pick), 64):
                x = torch.stack([data[int(i)][0] for i in pick[s:s + 64]]).to(param.device, param.dtype)
                chunks.append(backbone(x).float())  # [b, D]
            feats = torch.cat(chunks)
        feats = feats.float().to(next(backbone.parameters()).device)
        labels = torch.as_tensor(targets[pick], device=feats.device)
        return classes, torch.stack([feats[labels == c].mean(0) for c in classes])  # [M, D]

    def _cached_features(self, trainer: L.Trainer, pick: np.ndarray, targets: np.ndarray) -> Tensor | None:
        """Features of training rows `pick` from the feature cache the trainer is training on, if it is one whose
        rows are the training set in order; else None."""
        try:
            cache = getattr(getattr(trainer.train_dataloader, "dataset", None), "cache", None)
        except Exception:
            return None
        if cache is None or not hasattr(cache, "features") or len(cache) != len(targets):
            return None
        if not np.array_equal(np.asarray(cache.labels), targets):
            return None
        return cache.features(pick)

    def explain(self, backbone: nn.Module, head: nn.Module) -> Snapshot:
        """All maps and scalars of the tracked images for the current head: one engine forward for every map."""
        if not self._vectors_ready:
            raise CdamError("ExplanationCallback.explain called before its concept vectors were prepared")
        param = next(backbone.parameters())
        images = self.images.to(param.device, param.dtype)
        labels = self.labels.to(param.device)
        n_classes = len(self.classes)
        k = min(max(self.top_k, 2), n_classes)  # top-2 is needed for class sensitivity even when top_k = 1

        def targets(logits: Tensor) -> Tensor:  # [B, C] -> [B, 1 + k]: true class, then top-1 .. top-k
            return torch.cat([labels[:, None], logits.topk(k, dim=1).indices], dim=1)

        ex = CDAM(backbone, head).explain(images, targets=targets, concepts=self._vectors,
                                          similarity=self.similarity, attention=True)
        maps = ex.class_maps  # [B, 1+k, gh, gw]
        pred = ex.targets[:, 1]
        drop_top, drop_random = deletion_drop(
            backbone, head, images, maps[:, 1], pred, fraction=self.deletion_fraction, n_random=self.n_random,
            generator=torch.Generator().manual_seed(self.seed), seed=self.seed, logits=ex.logits,
            embed=self._removed)  # same random sets every step
        faith = (drop_top - drop_random).float()
        sens = map_correlation(maps[:, 1], maps[:, 2]) if k >= 2 else torch.full_like(faith, float("nan"))
        scalars = {
            "explain/compactness": compactness(maps[:, 1]).mean().item(),
            "explain/class_sensitivity": sens.mean().item(),
            "explain/faithfulness": faith.mean().item(),
            "explain/deletion_drop_top": drop_top.mean().item(),
            "explain/deletion_drop_random": drop_random.mean().item(),
        }
        cpu = lambda t: None if t is None else t.detach().float().cpu()  # noqa: E731
        return Snapshot(
            step=-1, targets=ex.targets.cpu(), probs=cpu(ex.logits.softmax(-1).gather(1, ex.targets)),
            class_maps=cpu(maps), concept_scores=cpu(ex.concept_scores), concept_maps=cpu(ex.concept_maps),
            attention=cpu(ex.attention.mean(1)), scalars=scalars, faithfulness=faith.cpu(),
        )

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        snap = self.explain(*self._parts(pl_module))
        snap.step = step
        self.last = snap
        self._remember(snap)
        panels = None  # drawn once, for the first logger that takes images
        for logger in trainer.loggers:
            logger.log_metrics(snap.scalars, step=step)
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_histogram"):
                exp.add_histogram("explain/scores_predicted", snap.class_maps[:, 1].flatten().numpy(), step)
                exp.add_histogram("explain/faithfulness_per_image", snap.faithfulness.numpy(), step)
            if hasattr(exp, "add_image"):
                panels = self.panels(snap) if panels is None else panels
                for tag, image in panels.items():
                    exp.add_image(tag, image, step, dataformats="HWC")
            if hasattr(exp, "flush"):
                exp.flush()

    def _remember(self, snap: Snapshot) -> None:
        """Keep the maps for the strips: at most max_strip_columns steps, thinned to stay evenly spread (first and
        latest always kept), so memory stays flat however long training runs."""
        self.history.append(Snapshot(
            step=snap.step, targets=snap.targets[:, :2], probs=snap.probs[:, :2], class_maps=snap.class_maps[:, :2],
            # head-independent maps: the first entry (never thinned out) keeps them for the strips
            concept_scores=None if self.history else snap.concept_scores,
            concept_maps=None if self.history else snap.concept_maps,
            attention=None if self.history else snap.attention,
            scalars=dict(snap.scalars), faithfulness=snap.faithfulness))
        if len(self.history) > self.max_strip_columns:
            steps = [s.step for s in self.history]
            gaps = [steps[i + 1] - steps[i - 1] for i in range(1, len(steps) - 1)]
            del self.history[1 + int(np.argmin(gaps))]

    # --- pictures -----------------------------------------------------------------------------------------------
    def _concepts_of(self, i: int) -> list[int]:
        """Concept columns shown for image i: every user concept, then its own class mean (if computed)."""
        own = int(self._own_mean[i]) if self._own_mean is not None else -1
        n_user = len(self.concept_images)
        return list(range(n_user)) + ([own] if own >= 0 else [])

    def _title(self, kind: str, c: int, p: float) -> str:
        return f"{kind}: {self.classes[c]} p={p:.2f}"

    def panels(self, snap: Snapshot) -> dict[str, np.ndarray]:
        """One titled panel (uint8 HWC) per tracked image and map kind, keyed by its TensorBoard tag."""
        out: dict[str, np.ndarray] = {}
        shown = min(self.top_k, len(self.classes))
        for i in range(len(self.labels)):
            t, p = snap.targets[i].tolist(), snap.probs[i].tolist()
            name = f"explain/img{i:02d}"
            when = "untrained head" if snap.step == 0 else f"after {snap.step} epoch{'s' if snap.step > 1 else ''}"
            sup = f"{self.ids[i]} (true {self.classes[t[0]]}), {when}"
            titles = [self._title("true", t[0], p[0]), self._title("pred", t[1], p[1])]
            titles += [self._title(f"top{j}", t[j], p[j]) for j in range(2, shown + 1)]
            img = self.images[i]
            out[f"{name}/classes"] = panel(img, list(snap.class_maps[i, :shown + 1]), titles, suptitle=sup,
                                           q=DISPLAY_Q, mean=self.mean, std=self.std)
            cols = self._concepts_of(i)
            if cols and snap.concept_maps is not None:
                out[f"{name}/concepts"] = panel(
                    img, [snap.concept_maps[i, m] for m in cols],
                    [f"{self.concept_names[m]} s={snap.concept_scores[i, m].item():.3g}" for m in cols],
                    suptitle=sup, vmax="per_map", q=DISPLAY_Q, mean=self.mean, std=self.std)
            out[f"{name}/attention"] = panel(img, [snap.attention[i]], ["attention (mean of heads)"], suptitle=sup,
                                             vmax="per_map", q=DISPLAY_Q, mean=self.mean, std=self.std)
        return out

    def _out_dir(self, trainer: L.Trainer) -> Path:
        """<log_dir>/explanations of the first logger with a log_dir (never trainer.log_dir: it broadcasts)."""
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if log_dir:
                return Path(log_dir) / "explanations"
        return Path(trainer.default_root_dir) / "explanations"

    def write_strips(self, out_dir: str | Path) -> list[Path]:
        """One PNG per tracked image: rows = map kinds, columns = logged epochs (written atomically)."""
        first = self.history[0]
        paths = []
        for i in range(len(self.labels)):
            img = to_uint8_image(self.images[i], mean=self.mean, std=self.std)
            cell = lambda m: overlay(img, m, q=DISPLAY_Q)  # noqa: E731  (each cell on its own colour range)
            true = self.classes[int(self.labels[i])]
            rows = [[cell(s.class_maps[i, 0]) for s in self.history], [cell(s.class_maps[i, 1]) for s in self.history]]
            row_titles = [f"true: {true}", "predicted"]
            if first.concept_maps is not None:
                for m in self._concepts_of(i):
                    rows.append([cell(first.concept_maps[i, m])])
                    row_titles.append(f"{self.concept_names[m]}\n(head-independent)")
            rows.append([cell(first.attention[i])])
            row_titles.append("attention\n(head-independent)")
            cols = [f"epoch {s.step}\npred {self.classes[int(s.targets[i, 1])]} {s.probs[i, 1].item():.2f}"
                    for s in self.history]
            picture = strip(rows, row_titles, cols,
                            suptitle=f"{self.ids[i]} (true {true}): CDAM by epoch, each cell on its own scale")
            slug = re.sub(r"[^A-Za-z0-9._-]+", "-", true).strip("-") or "class"
            paths.append(save_png(picture, Path(out_dir) / f"img{i:02d}_{slug}.png"))
        self.strip_paths = paths
        return paths

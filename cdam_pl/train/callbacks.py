"""`ExplanationCallback`: watch, epoch by epoch beside the accuracy curves, which evidence a classifier learns to use.

Built from keyword arguments alone, so any Lightning project (and LightningCLI's YAML) can add it. It tracks a fixed
set of validation images (stratified by class, seeded: the same images every epoch; picked when training starts
from the validation data the trainer has, or given as tensors) and logs, for each of them, from ONE batched
`CDAM.explain` call per logging step:
- class maps (CDAM) of the true class, the predicted class and the top-k classes (so a mistake shows what drove it);
- concept maps of every configured concept (name -> folder of example images, or example tensors) and, with
  `class_mean_data`, of the training-set class mean of the image's true class;
- the class-agnostic attention map (last block, CLS query, mean of heads), for comparison.

What it explains (`cdam_pl.train.explained.find_model`): this project's HeadClassifier, a LightningModule's
`cdam_model()`, or the one timm / Hugging Face ViT among the module's children.

Pictures have stable tags, one per tracked image and map kind: `explain/img00/classes` (a grid of at most three maps a
row), `explain/img00/concepts`, `explain/img00/attention`. Scalars per logging step: `explain/compactness_v1`,
`explain/compactness_symmetric` (the two rules, on the predicted class's maps), `explain/class_sensitivity`,
`explain/faithfulness` (+ `explain/deletion_drop_top`, `explain/deletion_drop_random`);
TensorBoard also gets the histograms `explain/scores_predicted` and `explain/faithfulness_per_image`. Where each
logger gets them (TensorBoard, `log_image` loggers such as W&B, PNG files for the others):
`cdam_pl.train.publish`. At the end of fitting one PNG strip per tracked image (maps across the logged epochs) goes
to `<log_dir>/explanations/`.

Step convention: step = number of training epochs completed. Step 0 is the untrained model, logged in
`on_train_start` (before the first training epoch); the validation at the end of epoch e (Lightning's
`current_epoch` = e) logs step e + 1, every `every_n_epochs` steps and after the last epoch (at the end of fitting
when no validation ran after it, e.g. an early stop or no validation set).

With a frozen backbone, concept and attention maps depend only on it, never on the head: they are logged at every
step (so every tag exists at every step) but are identical across steps, and the strips show them once. A backbone
that trains (fine-tuning end to end) changes them: concept vectors are then recomputed at every logging step and the
strips show those maps per step too.

It never changes training: it runs on the global-zero process only and calls nothing that synchronises processes
(no collective inside a rank-zero branch), never draws from the global RNG (reading validation samples restores
every global RNG state), restores every module mode it changes (the engine does too), registers no hooks, and reads
images from the datasets directly (no DataLoader, whose iterator would draw a seed from the global RNG).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from cdam_pl.data.images import list_images, load_image
from cdam_pl.data.splits import stratified_subset
from cdam_pl.data.transforms import build_transform
from cdam_pl.errors import CdamError, ConfigError, DataError
from cdam_pl.explain.cdam import CDAM, SIMILARITIES, concept_vectors
from cdam_pl.metrics.compactness import compactness_symmetric, compactness_v1
from cdam_pl.metrics.deletion import deletion_drop, embed_without_tokens
from cdam_pl.metrics.sensitivity import map_correlation
from cdam_pl.train.explained import Explained, find_model, pick_images
from cdam_pl.train.publish import EXPLANATIONS_DIR, log_dir, publish
from cdam_pl.viz.figures import panel, strip
from cdam_pl.viz.maps import DISPLAY_Q, overlay, save_png, to_uint8_image

__all__ = ["ExplanationCallback", "Snapshot", "check_concept_folder", "load_concept_images"]

MAPS_PER_ROW = 3  # class maps per row of the classes picture: one long row is too small inside a TensorBoard card


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


def check_concept_folder(name: str, folder: str) -> list[Path]:
    """The image files of one concept's folder; a one-line ConfigError naming the concept when there are none."""
    try:
        return list_images(folder)
    except DataError as e:
        raise ConfigError(f"explain.concepts.{name}: {e}; give a folder with one or more example images") from None


def load_concept_images(name: str, folder: str, transform) -> Tensor:
    """The example images of one concept as a batch [n, 3, H, W]; a one-line ConfigError naming the concept."""
    files = check_concept_folder(name, folder)
    try:
        return torch.stack([transform(load_image(f)) for f in files])
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

    num_images: how many validation images to track, picked when training starts (stratified by class, seeded with
    `seed`) from `trainer.datamodule.val_dataset` or the validation dataloaders' dataset; labels from the dataset's
    `targets` when it has them, else read from at most `max_label_reads` samples. Or pass `images` [B, 3, H, W] (as
    the model takes them) and `labels` [B] yourself. classes: names, else the data's `classes`, else the model's
    (a Hugging Face config), else the indices. concepts: name -> folder of example images (read with the data's
    eval transform, else resized to the tracked images' size and normalised with `mean`/`std`) or a tensor
    [n, 3, H, W]. class_mean_data: a dataset of (image tensor, label) with `.targets` for class-mean concepts.
    mean/std: the images' normalisation, to show them (default: the DataModule's `mean`/`std`, if any).
    See the module docstring for what is logged, when, and where.
    """

    def __init__(
        self,
        num_images: int = 8,
        every_n_epochs: int = 1,
        top_k: int = 3,
        concepts: Optional[Dict[str, Union[str, Path, Tensor]]] = None,
        *,
        images: Optional[Tensor] = None,
        labels: Optional[Union[Sequence[int], Tensor]] = None,
        classes: Optional[List[str]] = None,
        ids: Optional[List[str]] = None,
        mean: Optional[List[float]] = None,
        std: Optional[List[float]] = None,
        class_mean_data: Any = None,
        max_class_mean_images: int = 2000,
        similarity: str = "dot",
        deletion_fraction: float = 0.1,
        n_random: int = 4,
        seed: int = 0,
        max_strip_columns: int = 10,
        max_label_reads: int = 5000,
    ):
        super().__init__()
        for key, value in (("num_images", num_images), ("every_n_epochs", every_n_epochs), ("top_k", top_k),
                           ("n_random", n_random), ("max_class_mean_images", max_class_mean_images),
                           ("max_label_reads", max_label_reads)):
            if isinstance(value, bool) or int(value) < 1:
                raise ConfigError(f"explain.{key} must be > 0, got {value}")
        if int(max_strip_columns) < 2:
            raise ConfigError(f"max_strip_columns must be >= 2, got {max_strip_columns}")
        if similarity not in SIMILARITIES:
            raise ConfigError(f"explain.similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
        if (images is None) != (labels is None):
            raise ConfigError("pass images and labels together (or neither: the callback then picks validation "
                              "images itself)")
        self.num_images = int(num_images)
        self.images: Tensor | None = None  # [B, 3, H, W]
        self.labels: Tensor | None = None  # [B]
        if images is not None:
            self._track(images, labels, ids)
        self.classes = None if classes is None else [str(c) for c in classes]
        self.mean, self.std = mean, std
        self.every_n_epochs, self.top_k = int(every_n_epochs), int(top_k)
        self.concept_images: dict[str, Tensor] = {}
        self._concept_folders: dict[str, str] = {}  # read when fitting starts, with the data's transform
        for name, value in (concepts or {}).items():
            if isinstance(value, Tensor):
                self.concept_images[str(name)] = value.detach().cpu()
            else:
                self._concept_folders[str(name)] = str(value)
                check_concept_folder(str(name), str(value))  # a bad folder fails now, before training
        self.class_mean_data = class_mean_data
        self.max_class_mean_images = int(max_class_mean_images)
        self.similarity = similarity
        self.deletion_fraction, self.n_random, self.seed = float(deletion_fraction), int(n_random), int(seed)
        self.max_strip_columns = int(max_strip_columns)
        self.max_label_reads = int(max_label_reads)
        # Filled on the global-zero process when fitting starts.
        self.concept_names: list[str] = []
        self.trains_backbone = False  # whether the explained backbone trains (then concepts are recomputed)
        self._vectors: Tensor | None = None  # [M, D]: user concepts, then class means
        self._own_mean: Tensor | None = None  # [B]: concept index of each image's class mean, or -1
        self._removed = _RemovedTokenEmbeddings()
        self._vectors_ready = False
        self.class_mean_source: str | None = None  # "feature cache" or "images", once class means are computed
        self.last: Snapshot | None = None
        self.history: list[Snapshot] = []  # thinned to max_strip_columns entries; maps for the strips
        self.strip_paths: list[Path] = []
        self.png_paths: list[Path] = []  # pictures written as files, for loggers that take no images

    def _track(self, images: Tensor, labels: Any, ids: Sequence[str] | None) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise CdamError(f"tracked images must be a non-empty [B, 3, H, W] tensor, got {shape}")
        self.images = images.detach().cpu().clone()
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
        if self.labels.shape[0] != self.images.shape[0]:
            raise CdamError(f"got {self.images.shape[0]} tracked images but {self.labels.shape[0]} labels")
        self.ids = list(ids) if ids is not None else [f"image {i}" for i in range(len(self.labels))]

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
            num_images=len(idx), every_n_epochs=cfg.every_n_epochs, top_k=cfg.top_k, concepts=concepts,
            images=images, labels=[val.targets[i] for i in idx], classes=datamodule.classes,
            ids=[val.ids[i] for i in idx], mean=datamodule.mean, std=datamodule.std,
            class_mean_data=class_mean_data, max_class_mean_images=cfg.max_class_mean_images,
            similarity=cfg.similarity, seed=datamodule.seed,
        )

    # --- Lightning hooks ----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model = self._start(trainer, pl_module)
        self._prepare(trainer, model.backbone)
        if trainer.current_epoch == 0:  # a fresh run: the untrained model is the baseline (a resumed run has none)
            self._log(trainer, pl_module, step=0, model=model)

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
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Explained:
        """When fitting starts: find the model, pick the tracked images (unless given), name the classes, read the
        concept folders."""
        model = find_model(pl_module)
        self.trains_backbone = model.trains_backbone
        transform = None
        if self.images is None:
            tracked = pick_images(trainer, self.num_images, self.seed, self.max_label_reads)
            self._track(tracked.images, tracked.labels, tracked.ids)
            self.classes = self.classes or tracked.classes
            self.mean = self.mean if self.mean is not None else tracked.mean
            self.std = self.std if self.std is not None else tracked.std
            transform = tracked.transform
        param = next(model.backbone.parameters())
        logits = CDAM(model.backbone, model.head).explain(self.images.to(param.device, param.dtype)).logits
        n_out = int(logits.shape[1])
        self.classes = self.classes or model.classes or [str(c) for c in range(n_out)]
        if len(self.classes) != n_out:
            raise CdamError(f"the data names {len(self.classes)} classes but the model outputs {n_out} logits; pass "
                            "classes= with one name per output")
        if self._concept_folders:
            h, w = self.images.shape[-2:]
            zeros, ones = [0.0] * 3, [1.0] * 3
            transform = transform or build_transform((h, w), self.mean or zeros, self.std or ones)
            for name, folder in self._concept_folders.items():
                self.concept_images[name] = load_concept_images(name, folder, transform)
            self._concept_folders = {}
        return model

    @staticmethod
    def _ends_epoch(trainer: L.Trainer) -> bool:
        """Whether this validation ran after the last training batch of the epoch (Lightning's own criterion)."""
        try:
            progress = trainer.fit_loop.epoch_loop.batch_progress
            return progress.current.ready >= trainer.num_training_batches or bool(progress.is_last_batch)
        except AttributeError:  # another Lightning version: log every validation (one per step, see on_validation_end)
            return True

    @torch.no_grad()
    def _prepare(self, trainer: L.Trainer, backbone: nn.Module) -> None:
        """Concept vectors (user concepts, then class means): once when fitting starts, and again at every logging
        step when the backbone trains."""
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
        feats = None if self.trains_backbone else self._cached_features(trainer, pick, targets)
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
                                          similarity=self.similarity, attention=backbone.has_cls_token)
        maps = ex.class_maps  # [B, 1+k, gh, gw]
        pred = ex.targets[:, 1]
        drop_top, drop_random = deletion_drop(
            backbone, head, images, maps[:, 1], pred, fraction=self.deletion_fraction, n_random=self.n_random,
            generator=torch.Generator().manual_seed(self.seed), seed=self.seed, logits=ex.logits,
            embed=None if self.trains_backbone else self._removed)  # same random sets every step
        faith = (drop_top - drop_random).float()
        sens = map_correlation(maps[:, 1], maps[:, 2]) if k >= 2 else torch.full_like(faith, float("nan"))
        scalars = {
            "explain/compactness_v1": compactness_v1(maps[:, 1]).mean().item(),
            "explain/compactness_symmetric": compactness_symmetric(maps[:, 1]).mean().item(),
            "explain/class_sensitivity": sens.mean().item(),
            "explain/faithfulness": faith.mean().item(),
            "explain/deletion_drop_top": drop_top.mean().item(),
            "explain/deletion_drop_random": drop_random.mean().item(),
        }
        cpu = lambda t: None if t is None else t.detach().float().cpu()  # noqa: E731
        return Snapshot(
            step=-1, targets=ex.targets.cpu(), probs=cpu(ex.logits.softmax(-1).gather(1, ex.targets)),
            class_maps=cpu(maps), concept_scores=cpu(ex.concept_scores), concept_maps=cpu(ex.concept_maps),
            attention=None if ex.attention is None else cpu(ex.attention.mean(1)), scalars=scalars,
            faithfulness=faith.cpu(),
        )

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, model: Explained | None = None) -> None:
        model = model or find_model(pl_module)  # found again: a Hugging Face model is converted with its weights now
        if self.trains_backbone and step > 0:
            self._prepare(trainer, model.backbone)  # the backbone changed: so did the concept vectors
        snap = self.explain(model.backbone, model.head)
        snap.step = step
        self.last = snap
        self._remember(snap)
        histograms = {"explain/scores_predicted": snap.class_maps[:, 1].flatten().numpy(),
                      "explain/faithfulness_per_image": snap.faithfulness.numpy()}
        self.png_paths += publish(trainer.loggers, trainer.default_root_dir, step, snap.scalars, histograms,
                                  lambda: self.panels(snap))

    def _remember(self, snap: Snapshot) -> None:
        """Keep the maps for the strips: at most max_strip_columns steps, thinned to stay evenly spread (first and
        latest always kept), so memory stays flat however long training runs."""
        self.history.append(Snapshot(
            step=snap.step, targets=snap.targets[:, :2], probs=snap.probs[:, :2], class_maps=snap.class_maps[:, :2],
            # head-independent maps of a frozen backbone: the first entry (never thinned out) keeps them
            concept_scores=None if self.history and not self.trains_backbone else snap.concept_scores,
            concept_maps=None if self.history and not self.trains_backbone else snap.concept_maps,
            attention=None if self.history and not self.trains_backbone else snap.attention,
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
            when = "untrained" if snap.step == 0 else f"after {snap.step} epoch{'s' if snap.step > 1 else ''}"
            sup = f"{self.ids[i]} (true {self.classes[t[0]]}), {when}"
            titles = [self._title("true", t[0], p[0]), self._title("pred", t[1], p[1])]
            titles += [self._title(f"top{j}", t[j], p[j]) for j in range(2, shown + 1)]
            img = self.images[i]
            out[f"{name}/classes"] = panel(img, list(snap.class_maps[i, :shown + 1]), titles, suptitle=sup,
                                           q=DISPLAY_Q, mean=self.mean, std=self.std, max_columns=MAPS_PER_ROW)
            cols = self._concepts_of(i)
            if cols and snap.concept_maps is not None:
                out[f"{name}/concepts"] = panel(
                    img, [snap.concept_maps[i, m] for m in cols],
                    [f"{self.concept_names[m]} s={snap.concept_scores[i, m].item():.3g}" for m in cols],
                    suptitle=sup, vmax="per_map", q=DISPLAY_Q, mean=self.mean, std=self.std)
            if snap.attention is not None:
                out[f"{name}/attention"] = panel(img, [snap.attention[i]], ["attention (mean of heads)"],
                                                 suptitle=sup, vmax="per_map", q=DISPLAY_Q, mean=self.mean,
                                                 std=self.std)
        return out

    def _out_dir(self, trainer: L.Trainer) -> Path:
        """<log_dir>/explanations of the first logger with a log_dir, else of the trainer's default_root_dir."""
        dirs = [log_dir(logger, "") for logger in trainer.loggers if getattr(logger, "log_dir", None)]
        return (dirs[0] if dirs else Path(trainer.default_root_dir)) / EXPLANATIONS_DIR

    def write_strips(self, out_dir: str | Path) -> list[Path]:
        """One PNG per tracked image: rows = map kinds, columns = logged epochs (written atomically). Maps of a
        frozen backbone alone (concepts, attention) are shown once; those of a trained backbone per epoch."""
        first = self.history[0]
        every = [s for s in self.history if s.concept_maps is not None or s.attention is not None]
        once = "\n(head-independent)" if len(every) == 1 else ""
        paths = []
        for i in range(len(self.labels)):
            img = to_uint8_image(self.images[i], mean=self.mean, std=self.std)
            cell = lambda m: overlay(img, m, q=DISPLAY_Q)  # noqa: E731  (each cell on its own colour range)
            true = self.classes[int(self.labels[i])]
            rows = [[cell(s.class_maps[i, 0]) for s in self.history], [cell(s.class_maps[i, 1]) for s in self.history]]
            row_titles = [f"true: {true}", "predicted"]
            if first.concept_maps is not None:
                for m in self._concepts_of(i):
                    rows.append([cell(s.concept_maps[i, m]) for s in every])
                    row_titles.append(f"{self.concept_names[m]}{once}")
            if first.attention is not None:
                rows.append([cell(s.attention[i]) for s in every])
                row_titles.append(f"attention{once}")
            cols = [f"epoch {s.step}\npred {self.classes[int(s.targets[i, 1])]} {s.probs[i, 1].item():.2f}"
                    for s in self.history]
            picture = strip(rows, row_titles, cols,
                            suptitle=f"{self.ids[i]} (true {true}): CDAM by epoch, each cell on its own scale")
            slug = re.sub(r"[^A-Za-z0-9._-]+", "-", true).strip("-") or "class"
            paths.append(save_png(picture, Path(out_dir) / f"img{i:02d}_{slug}.png"))
        self.strip_paths = paths
        return paths

"""The LightningModule: a trainable head on a frozen backbone.

Batches are `(x, y)` where x is either images [B, 3, H, W] (run through the frozen backbone without autograd) or
cached features [B, D] (the backbone already ran once). Checkpoints hold the head only, plus the backbone's
identity, the class names and the resolved config as plain containers (see `cdam_pl.checkpoint`).
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from cdam_pl.backbone import FrozenViT
from cdam_pl.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KEY, check_backbone_matches
from cdam_pl.config import OptimConfig
from cdam_pl.heads import build_head
from cdam_pl.viz.figures import confusion_image


class HeadClassifier(L.LightningModule):
    def __init__(
        self,
        backbone: FrozenViT,
        classes: list[str],
        head: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.classes = list(classes)
        self.head_cfg = dict(head or {"kind": "linear"})
        self.optim_cfg = {**asdict(OptimConfig()), **(optim or {})}  # the schema's defaults, then the given values
        self.config = dict(config or {})
        c = len(self.classes)
        self.head = build_head(in_dim=backbone.feature_dim, num_classes=c, **self.head_cfg)
        metrics = {
            "acc": MulticlassAccuracy(c, average="micro"),
            "f1_macro": MulticlassF1Score(c, average="macro"),
        }
        if c > 5:
            metrics["acc_top5"] = MulticlassAccuracy(c, top_k=5, average="micro")
        self.train_metrics = MetricCollection({"acc": MulticlassAccuracy(c, average="micro")}, prefix="train/")
        self.val_metrics = MetricCollection(metrics, prefix="val/")
        self.val_per_class = MulticlassAccuracy(c, average=None)
        self.val_confusion = MulticlassConfusionMatrix(c)

    # --- forward ----------------------------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """Images -> frozen pooled features (no autograd); cached features pass through."""
        if x.ndim == 2:
            return x.float()
        with torch.no_grad():
            return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def _step(self, batch) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.optim_cfg["label_smoothing"])
        return loss, logits, y

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, logits, y = self._step(batch)
        self.train_metrics.update(logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        self.val_metrics.update(logits, y)
        self.val_per_class.update(logits, y)
        self.val_confusion.update(logits, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(y))

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=False)
        self.val_metrics.reset()
        per_class = self.val_per_class.compute()
        self.val_per_class.reset()
        self.log_dict({f"val_class_acc/{name}": a for name, a in zip(self.classes, per_class)})
        confusion = self.val_confusion.compute()
        self.val_confusion.reset()
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            for logger in self.trainer.loggers:
                exp = getattr(logger, "experiment", None)
                if hasattr(exp, "add_image"):
                    exp.add_image("val/confusion_matrix", confusion_image(confusion, self.classes),
                                  self.current_epoch, dataformats="HWC")

    # --- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        params = self.head.parameters()
        if o["name"] == "sgd":
            opt = torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
        elif o["name"] == "adam":
            opt = torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"])
        else:
            opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = max(1, self.trainer.max_epochs or 1)
        warmup = int(round(o["warmup_epochs"] * total / max_epochs))
        cosine = o["scheduler"] == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints: head only + identity ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("backbone.")}
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "backbone": dict(self.backbone.identity),
            "classes": list(self.classes),
            "head": dict(self.head_cfg),
            "optim": dict(self.optim_cfg),
            "config": self.config,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming: verify the backbone, then put its (unsaved) weights back so strict loading passes."""
        check_backbone_matches(checkpoint.get(CHECKPOINT_KEY, {}).get("backbone", {}), self.backbone)
        checkpoint["state_dict"].update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})

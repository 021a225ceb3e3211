"""Fine-tune a small timm ViT end to end on scikit-learn's digits (32 px) and watch its CDAM maps while it learns.

    python examples/finetune_timm.py                       # plain Lightning: TensorBoard + CSV logs in runs/finetune
    python examples/finetune_timm.py fit --config configs/lightning_cli_example.yaml   # the same through LightningCLI
"""
import sys

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from sklearn.datasets import load_digits
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from cdam_pl import ExplanationCallback


class Digits(L.LightningDataModule):
    classes = [str(d) for d in range(10)]  # the callback names classes from here
    mean, std = (0.5,) * 3, (0.5,) * 3  # and shows the images un-normalised

    def __init__(self, batch_size: int = 64, val_size: int = 300):
        super().__init__()
        self.batch_size, self.val_size = batch_size, val_size

    def setup(self, stage=None):
        d = load_digits()  # 8 x 8 grey digits, 0..16 -> [3, 32, 32] in [-1, 1]
        x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16
        x = ((x.repeat_interleave(4, 2).repeat_interleave(4, 3) - 0.5) / 0.5).expand(-1, 3, -1, -1)
        y = torch.tensor(d.target)
        self.train_dataset = TensorDataset(x[self.val_size:], y[self.val_size:])
        self.val_dataset = TensorDataset(x[:self.val_size], y[:self.val_size])  # the callback picks from here

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_dataset, batch_size=self.batch_size)


class FineTuneViT(L.LightningModule):
    def __init__(self, num_classes: int = 10, lr: float = 1e-3):
        super().__init__()
        self.lr = lr
        self.vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                     num_classes=num_classes, global_pool="avg")  # the callback finds it

    def forward(self, x):
        return self.vit(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(out_dir="runs/finetune", **trainer_kwargs):
    L.seed_everything(0)
    trainer = L.Trainer(max_epochs=2, default_root_dir=out_dir, callbacks=[ExplanationCallback(num_images=4)],
                        logger=[TensorBoardLogger(out_dir, name="tb"), CSVLogger(out_dir, name="csv")],
                        **trainer_kwargs)
    trainer.fit(FineTuneViT(), datamodule=Digits())
    return trainer


if __name__ == "__main__":
    LightningCLI(FineTuneViT, Digits) if len(sys.argv) > 1 else main()

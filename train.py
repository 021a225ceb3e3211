#!/usr/bin/env python
"""Train a linear or MLP head on a frozen self-supervised ViT.

    python train.py --config configs/demo.yaml trainer.max_epochs=5 data.train_size=2000
    python train.py --config configs/imagefolder.yaml data.root=/data/birds explain.concepts.beak=/data/beaks

Every key in the YAML can be overridden with key=value. Logs and checkpoints go to <out_dir>/<run_name>/version_N.
"""
import argparse
import sys

from cdam_pl.cli import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", help="YAML config (see configs/); defaults to the built-in schema")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=5")
    args = parser.parse_args(argv)

    def run():
        from cdam_pl.config import load_config
        from cdam_pl.train.run import run_training

        cfg = load_config(args.config, args.overrides)
        result = run_training(cfg)
        stopped = result["stopped"]
        if stopped:  # SIGTERM / Ctrl-C: last.ckpt is saved; one line, exit status 128 + signal number
            if result["trainer"].is_global_zero:
                print(stopped["message"], file=sys.stderr)
            return stopped["exit_code"]
        if result["trainer"].is_global_zero:
            m = result["metrics"]
            print(f"\nval accuracy {m.get('val/acc', float('nan')):.4f}  "
                  f"(features {result['seconds']['features']:.0f} s, total {result['seconds']['total']:.0f} s)")
            print(f"logs:        {result['run_dir']}   (tensorboard --logdir {result['run_dir']})")
            print(f"checkpoints: best {result['best_checkpoint']}\n             last {result['last_checkpoint']}")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())

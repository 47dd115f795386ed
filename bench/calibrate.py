"""Budget calibration: does a cell learn at a given cohort size and training length? For each configuration
(splits, epochs, learning rate), the from-scratch baseline none x full and, with ``--pretrain``, the same
strategy on a reconstruction-pre-trained body, trained with the Ray-free core on the embedded cohort at the
laptop resolution (16^3 at 4 mm); test Dice, AUC, score and the wall time of one trial on one thread.

    python -m bench.calibrate --splits pretrain=200,train=24,val=80,test=120 --epochs 20,40 --lr 1e-3 \\
        [--pretrain reconstruction] [--pretrain-epochs 10] [--seed 0]

Results: ``bench/results/calibrate.json`` (one row per configuration and method); the table the budget in
``study/plan/grid.py`` was chosen from is in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import print_table, write_result
from study.cohort import generate_cohort, parse_splits
from trainables.backbones import BackboneConfig
from trainables.data import DataConfig
from trainables.engine import TrainConfig
from trainables.pretrain.loop import PretrainConfig
from trainables.trials import FinetuneTrial, PretrainTrial, run_finetune, run_pretrain


def calibrate_one(manifest: Path, epochs: int, lr: float, seed: int, pretrain: str | None, pretrain_epochs: int,
                  cache: Path, width: int = 8, roi: str = "template") -> dict:
    data = DataConfig(manifest=str(manifest), spacing_mm=4.0, input_size=(16, 16, 16), roi=roi)
    backbone = BackboneConfig("segresnet", width=width)
    checkpoint, pretrain_s = None, 0.0
    if pretrain:
        start = time.perf_counter()
        spec = PretrainTrial(backbone, PretrainConfig(method=pretrain, epochs=pretrain_epochs, batch_size=2, seed=seed),
                             data, str(cache), data_id=manifest.parent.name)
        checkpoint = run_pretrain(spec, lambda m, s: None)["checkpoint_path"]
        pretrain_s = time.perf_counter() - start
    spec = FinetuneTrial(backbone, "full", {}, TrainConfig(epochs=epochs, batch_size=2, seed=seed, lr_encoder=lr,
                                                            lr_decoder=lr, lr_heads=lr, num_threads=1),
                         data, pretrain_checkpoint=checkpoint)
    start = time.perf_counter()
    final = run_finetune(spec, lambda m, s: None)
    return {"method": pretrain or "none", "epochs": epochs, "lr": lr, "test_dice": final["test_dice"],
            "test_auc": final["test_auc"], "test_accuracy": final["test_accuracy"], "test_score": final["test_score"],
            "val_score": final["score"], "trial_s": time.perf_counter() - start, "pretrain_s": pretrain_s,
            "time_per_epoch_s": final["time_per_epoch_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--splits", action="append", required=True, help="NAME=COUNT,...; repeat for several")
    p.add_argument("--epochs", default="30", help="comma list")
    p.add_argument("--lr", default="1e-3", help="comma list of learning rates (every part)")
    p.add_argument("--pretrain", default="", help="also fine-tune from this pre-training method")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="folder for the cohorts (default: a temporary one)")
    p.add_argument("--roi", default="template", choices=["template", "register", "none"],
                   help="how the embedded cohort reaches the box (default template, the launcher's default for it)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="calibrate-"))
    rows = []
    for text in args.splits:
        sizes = parse_splits(text)
        manifest = generate_cohort(work / "cohort", seed=args.seed, spacing=4.0, splits=sizes)
        for epochs in (int(e) for e in args.epochs.split(",")):
            for lr in (float(x) for x in args.lr.split(",")):
                for method in [None, *([args.pretrain] if args.pretrain else [])]:
                    row = {"splits": text, **calibrate_one(manifest, epochs, lr, args.seed, method,
                                                           args.pretrain_epochs, work / "cache", roi=args.roi)}
                    rows.append(row)
                    print_table([row], list(row))
                    sys.stdout.flush()
    print()
    print_table(rows, ["splits", "method", "epochs", "lr", "test_dice", "test_auc", "test_score", "trial_s"])
    write_result("calibrate", "python -m bench.calibrate " + " ".join(argv or sys.argv[1:]), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

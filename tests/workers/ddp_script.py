"""An unmodified Trainer script: it never imports sai_hf, so ``--optim sgd_sai`` only parses when it
is started through the launcher::

    torchrun --nproc_per_node 2 -m sai_hf.run tests/workers/ddp_script.py --output_dir OUT --optim sgd_sai ...

Every rank writes ``OUT/rank{r}.json`` (how it was run, the optimizer's scales) and
``OUT/weights_rank{r}.pt`` (the trained weights); the Trainer writes ``OUT/gsnr.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

sys.path.append(str(Path(__file__).resolve().parents[1] / "support"))  # tests/support (appended: sys.path[0] stays the script's directory)
from _models import TokenDataset, tiny_gpt2  # noqa: E402
from _processes import end_process_group  # noqa: E402


def main() -> None:
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())
    trainer.train()
    optimizer = trainer.optimizer
    while type(optimizer).__name__ != "SGDSaI":  # unwrap accelerate's AcceleratedOptimizer
        optimizer = optimizer.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    rank = int(os.environ.get("RANK", "0"))
    report = {
        "argv": sys.argv,
        "name": __name__,
        "file": __file__,
        "path0": sys.path[0],
        "world": int(os.environ.get("WORLD_SIZE", "1")),
        "parallel_mode": str(args.parallel_mode),
        "world_size": args.world_size,  # transformers' count (1 in each process when they train apart)
        "use_cpu": args.use_cpu,
        "optimizer": type(optimizer).__name__,
        "scales": {names[id(p)]: optimizer.state[p]["scale"] for p in scaled_params(optimizer)},
    }
    with open(os.path.join(args.output_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    torch.save(trainer.model.state_dict(), os.path.join(args.output_dir, f"weights_rank{rank}.pt"))


def scaled_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"] if "scale" in optimizer.state[p]]


if __name__ == "__main__":
    main()
    end_process_group()

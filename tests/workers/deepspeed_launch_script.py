"""A Trainer script as users write it (``HfArgumentParser``; ``import sai_hf`` registers ``--optim
sgd_sai``) on the tiny GPT-2, for the launcher tests of tests/distributed/test_deepspeed_zero3.py: writes
``OUT/run.json`` (losses, the DeepSpeed optimizer's class) from the main process."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # tests/support: _models

from _models import TokenDataset, tiny_gpt2  # noqa: E402
from transformers import HfArgumentParser, Trainer, TrainingArguments  # noqa: E402

import sai_hf  # noqa: E402,F401

(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())
trainer.train()
if trainer.is_world_process_zero():
    run = {
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "zero_optimizer": type(trainer.optimizer.optimizer).__name__,
        "world_size": args.world_size,
    }
    (Path(args.output_dir) / "run.json").write_text(json.dumps(run))
from _processes import end_process_group  # noqa: E402  (imports sai_hf: only now, after the script's own work)

end_process_group()  # barrier, destroy, exit without finalization: gloo's SIGABRT at exit (tests/support/_processes.py)

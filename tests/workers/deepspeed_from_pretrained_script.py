"""A Trainer script as transformers' examples are written (``run_clm.py``): arguments first, then
``from_pretrained``, and no ``import sai_hf`` (it runs through ``python -m sai_hf.run``). Under a ZeRO-3
config ``from_pretrained`` partitions the weights as it loads them (``deepspeed.zero.Init``), which on a
CPU-only machine needs DeepSpeed connected to the process group first (``sai_hf.integration.
connect_deepspeed_to_process_group``), for tests/distributed/test_deepspeed_zero3.py::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m sai_hf.run tests/workers/deepspeed_from_pretrained_script.py \\
        --model_name_or_path DIR --deepspeed configs/deepspeed/zero3.json --output_dir OUT --optim sgd_sai ...

Writes ``OUT/run.json`` (losses, the DeepSpeed optimizer's class, the world size, whether the loaded weights
were partitioned) from the main process; the Trainer writes ``OUT/gsnr.json``."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "support"))  # tests/support (appended: sys.path[0] stays the script's directory)

from _models import TokenDataset  # noqa: E402
from transformers import AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments  # noqa: E402


@dataclass
class ModelArguments:
    model_name_or_path: str


model_args, args = HfArgumentParser((ModelArguments, TrainingArguments)).parse_args_into_dataclasses()
model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
partitioned = all(hasattr(p, "ds_id") for p in model.parameters())  # made ZeRO-3 parameters by deepspeed.zero.Init
trainer = Trainer(model=model, args=args, train_dataset=TokenDataset())
trainer.train()
if trainer.is_world_process_zero():
    run = {
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "zero_optimizer": type(trainer.optimizer.optimizer).__name__,
        "world_size": args.world_size,
        "partitioned_at_load": partitioned,
    }
    (Path(args.output_dir) / "run.json").write_text(json.dumps(run))
from _processes import end_process_group  # noqa: E402  (imports sai_hf: only now, after the script's own work)

end_process_group()  # barrier, destroy, exit without finalization: gloo's SIGABRT at exit (tests/support/_processes.py)

"""Worker for test_resume: ``python tests/workers/resume_worker.py MODE DIR`` in a fresh process.

MODE ``full``: 10 steps, save weights. ``first``: 5 steps, save weights + optimizer state.
``resume``: load the ``first`` checkpoint, 5 more steps, save weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
sys.path.append(str(Path(__file__).resolve().parents[1] / "support"))  # tests/support: _models
from _models import lm_step, tiny_gpt2, token_batches
from _processes import end_process_group  # noqa: E402

from sai_hf import SGDSaI


def main(mode: str, out: Path) -> None:
    model = tiny_gpt2()
    opt = SGDSaI(model.parameters(), lr=1e-3, weight_decay=0.01)
    batches = token_batches(10)
    if mode == "resume":
        ckpt = torch.load(out / "first.pt")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        batches = batches[5:]
    elif mode == "first":
        batches = batches[:5]
    for ids in batches:
        lm_step(model, ids, opt)
    if mode == "first":
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out / "first.pt")
    else:
        torch.save(model.state_dict(), out / f"{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    end_process_group()

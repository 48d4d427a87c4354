"""Progress bars in logs: what a run writes to a stderr that is not a terminal.

``sai_hf.recipes.quiet.plain_progress`` (the recipes' Trainer): tqdm draws the evaluation bar that runs inside the
training bar one line lower and moves the cursor back up (``ESC[A``), which a log file keeps as ``[A`` on every
evaluation. The range test (``sai_hf.find_lr``) takes the Trainer's bar off altogether.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CURSOR_UP = "\x1b[A"

SCRIPT = """
import sys
sys.path[:0] = [{support!r}, {workers!r}]
import sai_hf
from _models import training_args
from lr_find_script import build
from sai_hf.recipes.quiet import plain_progress
args = training_args({out!r}, per_device_train_batch_size=8, logging_steps=2, disable_tqdm=False, eval_strategy="steps",
                     eval_steps=2, max_steps=4)
trainer = build(args, "normal")
print("replaced", plain_progress(trainer) if {plain} else None)
trainer.train()
trainer.evaluate()
"""


@pytest.mark.parametrize("plain", [False, True], ids=["trainer", "plain_progress"])
def test_no_cursor_moves_in_a_log_file(tmp_path, plain):
    """Evaluation every 2 steps during training, stderr a file: the Trainer's own bar writes ``ESC[A``;
    ``plain_progress`` writes none, while the training bar and the evaluation after training still show."""
    code = SCRIPT.format(support=str(ROOT / "tests" / "support"), workers=str(ROOT / "tests" / "workers"),
                         out=str(tmp_path / "out"), plain=plain)  # fmt: skip
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=240)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    if not plain:
        assert CURSOR_UP in text  # what the recipes' logs showed
        return
    assert "replaced True" in done.stdout
    assert CURSOR_UP not in text
    assert "4/4" in text  # the training bar
    assert "2/2" in text  # the evaluation after training keeps its bar (not nested)

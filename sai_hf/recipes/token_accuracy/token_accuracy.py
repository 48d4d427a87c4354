"""Token accuracy: the fraction of (unmasked) tokens predicted exactly, as an ``evaluate`` metric.

Load it from a local path (no hub access needed)::

    metric = evaluate.load("path/to/sai_hf/recipes/token_accuracy")
    metric.compute(predictions=[1, 2, 3], references=[1, 2, 4])  # {'accuracy': 0.666...}

Inputs are flat sequences of token ids; drop masked positions (label -100) before calling.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of token predictions equal to the reference token (next-token accuracy for causal LMs)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted token ids.
    references (`list` of `int`): reference token ids, same length.
Returns:
    accuracy (`float`): number of exact matches divided by number of tokens (0.0 when there are none).
"""


class TokenAccuracy(evaluate.Metric):
    """Exact-match accuracy over token ids."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.size == 0:
            return {"accuracy": 0.0}
        return {"accuracy": float((predictions == references).mean())}

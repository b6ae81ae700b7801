"""Tiny transformers models built from configs (nothing is downloaded), hand-made token data and short
Trainer runs, shared by the Trainer tests (a uniquely named helper module, imported by them; importing it
skips a test module without transformers)."""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Optional

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments,
)

transformers.utils.logging.set_verbosity_error()
logging.getLogger("accelerate").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=FutureWarning)

SEQ = 12
VOCAB = 100


def tiny_bert(num_labels: int, problem_type: Optional[str] = None, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     problem_type=problem_type)
    return BertForSequenceClassification(cfg)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64))


class Tokens(torch.utils.data.Dataset):
    """Random token ids "tokenised by hand"; labels: ``"regression"`` floats in [0, 1], ``"class"`` 0/1,
    ``"lm"`` the ids themselves (the causal LM shifts them)."""

    def __init__(self, labels: str, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.kind = labels
        self.y = torch.rand(n, generator=g) if labels == "regression" else torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        label = self.ids[i].clone() if self.kind == "lm" else self.y[i]
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": label}


def run_trainer(model: torch.nn.Module, data: torch.utils.data.Dataset, callback: Any, out: Any,
                collator: Optional[Callable] = None, resume: Optional[str] = None,
                eval_data: Optional[torch.utils.data.Dataset] = None, **args: Any) -> Trainer:
    """A short CPU Trainer run; ``args`` override the TrainingArguments below."""
    kw: dict[str, Any] = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=8, report_to=[],
                              use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
                              dataloader_num_workers=0)
    kw.update(args)
    trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=data, eval_dataset=eval_data,
                      callbacks=[callback] if callback is not None else None, data_collator=collator)
    trainer.train(resume_from_checkpoint=resume)
    return trainer

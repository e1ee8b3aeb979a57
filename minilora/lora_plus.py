"""LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou, Ghosh, Yu 2024, arXiv 2402.12354).

    h = W0 x + (alpha/r) · B A x        (LoRA's model, unchanged)
    η_B = λ · η_A,  λ = lr_ratio ≫ 1     (LoRA+: B learns λ times faster than A)

Trained: lora_A, lora_B of each adapted module (and biases with bias="all" or "lora_only"), as LoRA.
Frozen: everything else.
Init: LoRA's (A Kaiming-uniform, B = 0), so step 0 is the base model.
Why: with one learning rate for both, the paper's analysis of wide models finds feature learning inefficient: A and B
    play different roles (B starts at 0 and multiplies A x), and the step size that is stable for A is too small for B.
    Giving B a rate λ times A's fixes it; the model, the adapter file and inference are LoRA's, only training differs.
Optimizer: AdamW (betas and decay rule of train.default_optimizer) with parameter groups as PEFT's
    create_loraplus_optimizer (peft/optimizers/loraplus.py):
        A (and every other matrix)             lr η,       weight decay wd
        B                                      lr λ·η,     weight decay wd
        1-D parameters (biases)                lr λ·η,     weight decay 0
        LoRA on the embedding (both factors)   lr lr_embedding (PEFT's loraplus_lr_embedding), weight decay wd
    train() gets it from LoRAPlusConfig.optimizer and scales every group's lr by the same warmup/cosine factor.
    η is the learning rate you pass (TrainConfig.lr, minilora.METHODS["lora_plus"].lr): A's rate.
Files: a LoRA file (PEFT reads it as plain LoRA), with `lr_ratio` in minilora_config; PEFT's LoRA files load as "lora".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import lora
from .attach import register
from .lora import LoRAConfig, LoRAEmbedding


@dataclass
class LoRAPlusConfig(LoRAConfig):
    """LoRAConfig's fields (r, alpha, dropout, targets, layers, ...), plus:"""
    lr_ratio: float = 16.0  # λ = η_B / η_A (PEFT's loraplus_lr_ratio; the official README's example uses 20)
    lr_embedding: float = 1e-6  # peak lr of LoRA on the embedding, with embedding=True (PEFT's default)

    def __post_init__(self):
        super().__post_init__()
        if not self.lr_ratio > 0:
            raise ValueError(f"lr_ratio={self.lr_ratio}: λ = η_B/η_A must be positive (LoRA+ uses λ ≫ 1; 1 is LoRA)")

    @classmethod
    def peft_match(cls, raw: dict) -> bool:
        return False  # a PEFT LoRA file is plain LoRA: it loads as "lora"

    def optimizer(self, model, lr, weight_decay):
        return torch.optim.AdamW(loraplus_param_groups(model, lr, self.lr_ratio, weight_decay, self.lr_embedding),
                                 lr=lr, betas=(0.9, 0.95))  # betas of train.default_optimizer


def loraplus_param_groups(model, lr: float, lr_ratio: float, weight_decay: float = 0.0,
                          lr_embedding: float = 1e-6) -> list[dict]:
    """The trainable parameters in PEFT's four LoRA+ groups (empty groups dropped): A, embedding, B, 1-D."""
    embedding = {id(p) for m in model.modules() if isinstance(m, LoRAEmbedding)
                 for p in [*m.lora_embedding_A.values(), *m.lora_embedding_B.values()]}
    groups = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding:
            groups["embedding"].append(p)
        elif p.dim() < 2:  # biases: B's rate, no decay (PEFT's rule for 1-D parameters)
            groups["B_no_decay"].append(p)
        elif ".lora_B." in name:
            groups["B"].append(p)
        else:
            groups["A"].append(p)
    settings = {"A": (lr, weight_decay), "embedding": (lr_embedding, weight_decay),
                "B": (lr * lr_ratio, weight_decay), "B_no_decay": (lr * lr_ratio, 0.0)}
    return [{"params": ps, "lr": settings[k][0], "weight_decay": settings[k][1]} for k, ps in groups.items() if ps]


@register("lora_plus", LoRAPlusConfig, lr=3e-3,
          description="LoRA+: LoRA with B's learning rate lr_ratio (λ) times A's")
def apply(model, config: LoRAPlusConfig) -> None:
    lora.apply(model, config)  # LoRA's modules; LoRA+ changes only the optimizer (LoRAPlusConfig.optimizer)

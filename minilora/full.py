"""Full fine-tuning: the baseline every parameter-efficient method is measured against.

    W <- W - lr * AdamW(dL/dW)   for every weight of the model

Trained: every parameter (or, with `layers`, only the chosen blocks: "top-k layer" tuning, the
    baseline Houlsby et al. 2019 compare adapters with at equal parameter count).
Frozen: nothing (or the blocks not chosen, plus embeddings and ln_f when `layers` is set).
Init: the pretrained weights themselves; nothing new is added.
Cost (fp32 AdamW): 4 bytes weight + 4 gradient + 8 for the two moments = 16 bytes per parameter,
plus activations. The saved "adapter" is the whole model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .attach import MethodConfig, register


@dataclass
class FullConfig(MethodConfig):
    layers: list[int] | None = None  # None: train everything; else only these blocks transformer.h.<i>

    def trainable(self, name: str) -> bool:
        if self.layers is None:
            return True
        m = re.match(r"transformer\.h\.(\d+)\.", name)
        return m is not None and int(m.group(1)) in self.layers

    def saved_key(self, name: str) -> str:
        return name  # a full checkpoint keeps the model's own names


@register("full", FullConfig, lr=1e-3, description="full fine-tuning: every weight trains")
def apply(model, config: FullConfig) -> None:
    if config.layers is not None:
        n_layer = len(model.transformer.h)
        bad = [i for i in config.layers if not 0 <= i < n_layer]
        if bad:
            raise ValueError(f"layers {bad} do not exist: this model has blocks 0..{n_layer - 1}")
    # nothing to add or replace: full fine-tuning trains the model as it is

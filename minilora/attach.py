"""The one place where a fine-tuning method meets a model.

    model = GPT.from_pretrained("data/base")
    minilora.attach(model, LoRAConfig(r=8, alpha=16, targets=["c_attn"]))  # replaces modules in place
    ...train...
    minilora.save_adapter(model, "runs/my-adapter")     # only the method's tensors + its config
    minilora.load_adapter(fresh_model, "runs/my-adapter")  # attaches the method, then loads

How a method plugs in (each method file does exactly this, nothing else in minilora changes):
1. a config dataclass subclassing MethodConfig, with a `trainable(name)` rule that says, from a
   parameter's name, whether it trains (LoRA: "lora_" in name; full fine-tuning: everything);
2. an `apply(model, config)` function that swaps the model's modules for the method's modules;
3. `@register("name", ConfigClass, lr=...)` on that function, so the CLI, `compare` and the benchmarks
   find it by name. `minilora.METHODS` is the registry.
"""
from __future__ import annotations

import dataclasses
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, atomic_write_text, load_safetensors, read_json, save_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names, so the two can read each other
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class MethodConfig:
    """Base of every method's config. Subclasses add their own fields (each commented)."""

    def trainable(self, name: str) -> bool:
        """Whether the parameter called `name` (as in model.named_parameters()) trains."""
        raise NotImplementedError

    def saved_key(self, name: str) -> str:
        """The key a trained tensor gets in the adapter file (PEFT's prefix by default)."""
        return "base_model.model." + name

    def export_state(self, model, state: dict) -> dict:
        """{saved_key: tensor} -> the tensors as the adapter file holds them. Identity by default; a method
        whose parameter layout differs from PEFT's converts here (and back in import_state)."""
        return state

    def import_state(self, model, state: dict) -> dict:
        """Inverse of export_state: the file's tensors -> {saved_key: tensor} in the model's layout."""
        return state

    def callbacks(self, model) -> list:
        """Training-loop callbacks the method needs on every step (train.Callback); none by default."""
        return []

    def optimizer(self, model, lr, weight_decay):
        """An optimizer the method needs instead of the default AdamW, or None for the default."""
        return None

    def to_json(self) -> dict:
        """The adapter_config.json contents; methods with a PEFT equivalent add PEFT's fields."""
        return {"minilora_method": method_of(self), **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, raw: dict) -> "MethodConfig":
        """Inverse of to_json (methods that read PEFT's adapter_config.json override this)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    peft_type: ClassVar[str | None] = None  # PEFT's name for the method, where PEFT has it ("LORA")

    @classmethod
    def peft_match(cls, raw: dict) -> bool:
        """Whether a PEFT adapter_config.json with this peft_type is this method (PEFT saves some
        methods under one peft_type: DoRA is LORA + use_dora)."""
        return True
    identity_at_init: ClassVar[bool] = True  # whether attaching leaves the model's outputs unchanged


@dataclass
class Method:
    name: str
    config_cls: type
    apply: Callable[[nn.Module, MethodConfig], None]
    lr: float  # a learning rate that works for this method on the embedded task
    description: str = ""


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type, lr: float, description: str = ""):
    """Decorator for a method's apply(model, config) function."""
    def wrap(apply):
        METHODS[name] = Method(name, config_cls, apply, lr, description)
        return apply
    return wrap


def method_of(config: MethodConfig) -> str:
    for m in METHODS.values():
        if type(config) is m.config_cls:
            return m.name
    raise ValueError(f"{type(config).__name__} is not a registered method config; "
                     f"registered: {sorted(METHODS)}")


def attach(model: nn.Module, config: MethodConfig) -> nn.Module:
    """Put the method described by `config` onto `model` (in place) and mark what trains.
    Returns the model, so `model = attach(GPT(...), cfg)` reads naturally."""
    if getattr(model, "minilora_config", None) is not None:
        raise ValueError(f"this model already has {method_of(model.minilora_config)!r} attached; "
                         f"attach to a fresh model (methods are not stacked)")
    method = METHODS[method_of(config)]
    with modules_take_the_mode(model):
        method.apply(model, config)
    model.minilora_config = config  # remembered for mark_trainable / save_adapter
    mark_trainable(model)
    return model


@contextmanager
def modules_take_the_mode(model: nn.Module):
    """Modules added inside the block take the model's train/eval mode: a new nn.Module starts in training mode,
    and left so on a model in eval mode it would keep dropout (and LongLoRA's S²-Attn) on at inference."""
    old = list(model.modules())  # held, so that no replaced module's id() is reused by a new one
    yield model
    ids = {id(m) for m in old}
    for m in model.modules():
        if id(m) not in ids:
            m.training = model.training  # this module only: the old modules inside it keep theirs


def mark_trainable(model: nn.Module) -> list[str]:
    """Set requires_grad from the attached config's rule; returns the trainable names."""
    config = _config(model)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(config.trainable(name))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"{type(config).__name__} marks no parameter trainable; check its targets")
    return names


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a method trained, under their saved keys: what save_adapter writes."""
    config = _config(model)
    state = {config.saved_key(n): p.detach() for n, p in model.named_parameters() if config.trainable(n)}
    return config.export_state(model, state)


def save_adapter(model: nn.Module, directory) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (only the method's tensors), atomically."""
    directory = Path(directory)
    config = _config(model)
    state = adapter_state_dict(model)
    meta = {"format": "pt", "minilora_method": method_of(config)}
    save_safetensors(state, directory / ADAPTER_WEIGHTS, metadata=meta)
    cfg = {**config.to_json(), "base_shapes": _shape_fingerprint(model)}
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(cfg, indent=2, default=list) + "\n")
    return directory


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Attach the saved method to `model` (unless already attached) and load its tensors.
    Refuses, naming the keys, an adapter whose tensors do not fit this model."""
    directory = Path(directory)
    raw = read_json(directory / ADAPTER_CONFIG)
    name = raw.get("minilora_method")
    if name is None and raw.get("peft_type"):  # an adapter saved by PEFT
        name = next((m.name for m in METHODS.values()
                     if m.config_cls.peft_type == raw["peft_type"] and m.config_cls.peft_match(raw)), None)
    if name not in METHODS:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG} is for method {name or raw.get('peft_type')!r}, "
                              f"which minilora does not know; known: {sorted(METHODS)}")
    config = METHODS[name].config_cls.from_json(raw)
    state = load_safetensors(directory / ADAPTER_WEIGHTS)
    if getattr(model, "minilora_config", None) is None:
        try:
            attach(model, config)
        except ValueError as e:  # the saved config does not fit this model at all (a group size, a rank, ...)
            raise CheckpointError(f"adapter in {directory} was made for another model: {e} (saved for base shapes "
                                  f"{raw.get('base_shapes')}, this model is {_shape_fingerprint(model)})") from e
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"adapter in {directory} was made for another model: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}, shape mismatches {wrong[:5]} "
            f"(saved for base shapes {raw.get('base_shapes')}, this model is {_shape_fingerprint(model)})")
    params = dict(model.named_parameters())
    state = config.import_state(model, state)
    with torch.no_grad():
        for n, p in params.items():
            if config.trainable(n):
                p.copy_(state[config.saved_key(n)])
    return model


def _config(model) -> MethodConfig:
    config = getattr(model, "minilora_config", None)
    if config is None:
        raise ValueError("no method is attached to this model; call minilora.attach(model, config) first")
    return config


def _shape_fingerprint(model):
    cfg = getattr(model, "config", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None


# ------------------------------------------------------------------------ choosing target modules
def find_targets(model: nn.Module, names, layers=None, kind=nn.Linear) -> list[str]:
    r"""Names of the modules of type `kind` that a method adapts, chosen as PEFT's target_modules does.

    names: a list of module-name suffixes (["c_attn", "mlp.c_proj"]), a regular expression that must
        match the whole module name (r"transformer\.h\.[0-3]\.attn\.c_attn"), or "all-linear"
        (every nn.Linear except the output head).
    layers: optional block indices (transformer.h.<i>) to keep, as PEFT's layers_to_transform.
    kind: the module type to consider, or a tuple of types (a method that wraps modules passes its wrapper too).
    Never empty: a selection that matches nothing is an error listing what could match."""
    candidates = [n for n, m in model.named_modules() if isinstance(m, kind)]
    if names == "all-linear":
        chosen = [n for n in candidates if not n.endswith("lm_head")]
    elif isinstance(names, str):
        pattern = re.compile(names)
        chosen = [n for n in candidates if pattern.fullmatch(n)]
    else:
        chosen = [n for n in candidates if any(n == s or n.endswith("." + s) for s in names)]
    if layers is not None:
        chosen = [n for n in chosen if (m := re.search(r"\.h\.(\d+)\.", n)) and int(m.group(1)) in layers]
    if not chosen:
        kind_name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"targets {names!r} (layers {layers}) match no {kind_name} module; "
                         f"candidates are e.g. {candidates[:6]}")
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule called `name` (dotted path) for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ------------------------------------------------------------------------ merging
# A module a method adds may implement merge() (fold its update into the base weight, idempotent),
# unmerge() (take it out again) and unload() (return the plain module that replaces it for good).
def merge(model: nn.Module) -> nn.Module:
    """Fold every mergeable adapter into its base weight: same outputs, no extra latency."""
    for m in model.modules():
        if m is not model and hasattr(m, "merge"):
            m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if m is not model and hasattr(m, "unmerge"):
            m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then swap every adapter module for its plain merged module: the model is a plain GPT
    again (with the fine-tuned weights), with no method attached."""
    merge(model)
    names = [n for n, m in model.named_modules() if n and hasattr(m, "unload")]
    for n in names:
        if any(n.startswith(o + ".") for o in names if o != n):
            continue  # nested inside another adapter module, which unloads it
        replace_module(model, n, model.get_submodule(n).unload())
    model.minilora_config = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model

"""minilora: LLM fine-tuning methods in readable PyTorch, on a small GPT.

Every method attaches through one place, minilora/attach.py:

    from minilora import GPT, attach, save_adapter
    model = GPT.from_pretrained(minilora.BASE_DIR)
    attach(model, FullConfig())
"""
from .attach import (METHODS, MethodConfig, adapter_state_dict, attach, load_adapter, mark_trainable,
                     merge, merge_and_unload, register, save_adapter, unmerge)
from .checkpoint import CheckpointError
from .gpt import GPT, GPTConfig, PRESETS
from .settings import BASE_DIR, quick

# Each import below registers one method in METHODS; a new method file adds one line here.
from .full import FullConfig  # noqa: E402
from .lora import LoRAConfig  # noqa: E402
from .adapters import AdapterConfig, PfeifferConfig  # noqa: E402
from .prefix import PrefixConfig  # noqa: E402
from .prompt import PromptConfig  # noqa: E402
from .adalora import AdaLoRAConfig  # noqa: E402
from .qlora import QLoRAConfig  # noqa: E402
from .dora import DoRAConfig, QDoRAConfig  # noqa: E402
from .lora_fa import LoRAFAConfig  # noqa: E402
from .lora_plus import LoRAPlusConfig  # noqa: E402
from .pissa import OLoRAConfig, PiSSAConfig  # noqa: E402
from .loftq import LoftQConfig  # noqa: E402
from .llama_adapter import LlamaAdapterConfig  # noqa: E402
from .longlora import LongLoRAConfig  # noqa: E402
from .vera import VeRAConfig  # noqa: E402
from .tied_lora import TiedLoRAConfig  # noqa: E402
from .qa_lora import QALoRAConfig  # noqa: E402

__all__ = ["GPT", "GPTConfig", "PRESETS", "METHODS", "MethodConfig", "attach", "mark_trainable",
           "adapter_state_dict", "save_adapter", "load_adapter", "merge", "unmerge", "merge_and_unload", "register", "CheckpointError",
           "BASE_DIR", "quick", "FullConfig", "LoRAConfig", "AdapterConfig", "PfeifferConfig", "PrefixConfig", "PromptConfig", "AdaLoRAConfig", "QLoRAConfig", "DoRAConfig", "QDoRAConfig",
           "LoRAFAConfig", "LoRAPlusConfig", "PiSSAConfig", "OLoRAConfig", "LoftQConfig", "LlamaAdapterConfig",
           "LongLoRAConfig", "VeRAConfig", "TiedLoRAConfig", "QALoRAConfig"]

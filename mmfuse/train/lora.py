"""LoRA through peft on the LLM and on the fusion modules (Type-A's cross-attention blocks, as
MultiModal-GPT does), injected in place so ``model.llm`` stays a plain Hugging Face model.

``inject_adapter_in_model`` swaps each targeted layer for a peft LoRA layer (the original weight
becomes ``<layer>.base_layer.weight``, the adapters ``<layer>.lora_A.default.weight`` and
``<layer>.lora_B.default.weight``); ``model.llm`` keeps its class, so ``generate()`` works, and the
parameter names are the same every time the same config is injected, which is what resuming needs.
:func:`merge_lora` folds the adapters into the base weights and puts the original layers back.
"""

from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from mmfuse.train.config import StageConfig

LORA_MARKER = "lora_"  # peft's prefix for every LoRA parameter name


def add_lora(module: nn.Module, stage: StageConfig) -> None:
    """Inject the stage's LoRA adapters into ``module`` in place (new adapters draw from torch's RNG)."""
    if has_lora(module):
        raise ValueError(f"stage {stage.name!r}: the module already carries LoRA adapters; merge them first")
    config = LoraConfig(
        r=stage.lora_r,
        lora_alpha=stage.lora_alpha,
        lora_dropout=stage.lora_dropout,
        target_modules=stage.lora_target_modules,
    )
    inject_adapter_in_model(config, module)


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in module.modules())


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every LoRA parameter in ``model``, by its full name."""
    return [(n, p) for n, p in model.named_parameters() if LORA_MARKER in n]


def merge_lora(llm: nn.Module) -> None:
    """Fold every LoRA adapter into its base weight and put the plain layer back, in place."""
    for name, module in list(llm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(llm.get_submodule(parent), child, module.get_base_layer())
    if hasattr(llm, "peft_config"):
        del llm.peft_config

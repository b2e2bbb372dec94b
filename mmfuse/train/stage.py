"""Freezing: which parameters a stage trains."""

from __future__ import annotations

import fnmatch
import weakref

import torch
from torch import nn

from mmfuse.train.config import LORA_GROUPS, StageConfig
from mmfuse.train.lora import add_lora, has_lora, lora_parameters


def resolve_groups(model: nn.Module, entries: list[str]) -> list[str]:
    """What ``entries`` select: an entry names a group of ``model.parameter_groups()``, a prefix of
    groups (``"connectors"`` selects ``"connectors.image"``), or a module path inside a group
    (``"connectors.image.core.proj"``: MiniGPT-4 trains only its projection). Returns the group names
    and paths in order; unknown entries raise."""
    groups = model.parameter_groups()
    available = sorted(groups)
    selected = []
    for entry in entries:
        matches = [g for g in available if g == entry or g.startswith(entry + ".")]
        if not matches and any(n.startswith(entry + ".") for ps in groups.values() for n, _ in ps):
            matches = [entry]
        if not matches:
            raise ValueError(f"no parameter group or module path matches {entry!r}; the model has groups {available}")
        selected += [g for g in matches if g not in selected]
    return selected


def group_parameters(model: nn.Module, entries: list[str]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs of the groups and paths ``entries`` select, in ``named_parameters()`` order."""
    groups = model.parameter_groups()
    wanted = set()
    for selection in resolve_groups(model, entries):
        members = groups.get(selection) or [(n, p) for ps in groups.values() for n, p in ps if n.startswith(selection + ".")]
        wanted |= {id(p) for _, p in members}
    return [(n, p) for n, p in model.named_parameters() if id(p) in wanted]


# model -> the gradient hooks that restrict its vocabulary tables to the added rows (one stage at a time)
_ROW_HOOKS: "weakref.WeakKeyDictionary[nn.Module, list[torch.utils.hooks.RemovableHandle]]" = weakref.WeakKeyDictionary()


def vocabulary_tables(model: nn.Module) -> list[nn.Parameter]:
    """The LLM's input embedding weight and, when it is not tied to it, the LM head's weight."""
    embedding = model.llm.get_input_embeddings().weight
    head = getattr(model.llm.get_output_embeddings(), "weight", None)
    return [embedding] + ([head] if head is not None and head is not embedding else [])


def added_token_rows(model: nn.Module, stage: StageConfig) -> list[nn.Parameter]:
    """For ``stage.train_added_tokens``: the vocabulary tables (:func:`vocabulary_tables`), with gradient
    hooks that keep only the rows of the added tokens (a previous stage's hooks are removed first).
    Empty otherwise."""
    for hook in _ROW_HOOKS.pop(model, []):
        hook.remove()
    if not stage.train_added_tokens:
        return []
    ids = model.added_token_ids()
    if not ids:
        raise ValueError(f"stage {stage.name!r}: train_added_tokens needs added tokens (llm.add_tokens, or Type-D media codes)")
    if {"llm.embeddings", "llm.head"} & set(resolve_groups(model, stage.train)):
        raise ValueError(f"stage {stage.name!r}: train_added_tokens and llm.embeddings / llm.head both listed; pick one")
    tables = vocabulary_tables(model)
    rows = torch.zeros(tables[0].shape[0], 1, dtype=tables[0].dtype, device=tables[0].device)
    rows[ids] = 1
    for table in tables:  # a LoRA stage's peft wrapping has just frozen them, and a hook needs a gradient
        table.requires_grad_(True)
    _ROW_HOOKS[model] = [table.register_hook(lambda grad: grad * rows.to(grad.dtype)) for table in tables]
    return tables


def apply_stage(model: nn.Module, stage: StageConfig) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the stage's ``train`` groups and inject (and unfreeze) its
    LoRA adapters (and, with ``train_added_tokens``, the added embedding rows). Returns the trainable
    parameters in ``named_parameters()`` order."""
    resolve_groups(model, stage.train + stage.lora)  # fail on unknown names before touching the model
    for group in LORA_GROUPS:
        module = getattr(model, group, None)
        if module is None:
            continue
        if group in stage.lora and not has_lora(module):
            add_lora(module, stage)
        elif group not in stage.lora and has_lora(module):
            raise ValueError(f"stage {stage.name!r}: model.{group} still carries LoRA adapters; merge_lora(model.{group}) first")
    lora = lora_parameters(model)
    rows = added_token_rows(model, stage)
    trainable = {id(p) for _, p in group_parameters(model, stage.train) + lora} | {id(table) for table in rows}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"stage {stage.name!r}: the selected groups hold no parameters")
    return params


def optimizer_groups(model: nn.Module, params: list[nn.Parameter], stage: StageConfig) -> list[dict]:
    """AdamW parameter groups: ``params`` at ``stage.lr``, except those whose name matches a
    ``stage.lr_scale`` pattern, at ``lr * scale`` (one group per pattern, in the patterns' order), and
    the row-restricted vocabulary tables of ``train_added_tokens``, last, without weight decay (it would
    shrink the frozen rows)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    patterns = list(stage.lr_scale)
    members: dict[str | None, list[nn.Parameter]] = {None: [], **{pattern: [] for pattern in patterns}}
    rows = {id(table) for table in vocabulary_tables(model)} if stage.train_added_tokens else set()
    for param in params:
        if id(param) in rows:
            continue
        match = next((pattern for pattern in patterns if fnmatch.fnmatchcase(name_of[id(param)], pattern)), None)
        members[match].append(param)
    unmatched = [pattern for pattern in patterns if not members[pattern]]
    if unmatched:
        raise ValueError(f"stage {stage.name!r}: lr_scale pattern(s) {unmatched} match no parameter this stage trains")
    groups = [{"params": members[None], "lr": stage.lr}] if members[None] else []
    groups += [{"params": members[p], "lr": stage.lr * stage.lr_scale[p]} for p in patterns]
    tables = [p for p in params if id(p) in rows]
    return groups + ([{"params": tables, "lr": stage.lr, "weight_decay": 0.0}] if tables else [])

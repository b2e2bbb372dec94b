"""Fully sharded data parallel training with torch's FSDP2 (``fully_shard``).

``accelerate launch --use_fsdp --fsdp_version 2`` asks for it (accelerate sets ``ACCELERATE_USE_FSDP``);
accelerate still starts the processes and the process group. mmfuse shards the model itself rather than
through ``accelerator.prepare``: accelerate shards only on accelerators, and a stage needs a sharded
replica it can gather back into the plain model when it ends (LoRA merges, the next stage freezes
other parameters). So a stage trains ``shard_model(model)``, a copy whose every LLM/encoder block
(the classes the model lists in ``_no_split_modules``) and root are ``fully_shard``-ed: each process
holds 1/N of every parameter, frozen and trainable mixed, and of the optimizer state. The plain model
stays where it was built (CPU) and receives the trained parameters at checkpoints and at the stage's
end (:func:`gather_parameters`).
"""

from __future__ import annotations

import copy
import os

import torch
from accelerate.utils import parse_flag_from_env
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True)


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch --use_fsdp``); FSDP1 is refused."""
    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(f"mmfuse shards with FSDP2; launch with --fsdp_version 2 (got FSDP_VERSION={version})")
    return True


def block_classes(model: nn.Module) -> set[type]:
    """The classes of the blocks to shard one by one: every submodule's ``_no_split_modules``
    (transformers' decoder/encoder layers)."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def shard_model(model: nn.Module, device: torch.device, mixed_precision: str) -> nn.Module:
    """A copy of ``model`` on ``device`` with process 0's weights, ``fully_shard``-ed per block and at
    the root. ``mixed_precision`` "bf16" computes in bf16 and reduces gradients in fp32."""
    if mixed_precision == "fp16":
        raise ValueError("FSDP stages take mixed_precision 'bf16' or 'no' (fp16 needs a grad scaler FSDP2 has no use for)")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision == "bf16" else MixedPrecisionPolicy()
    replica = copy.deepcopy(model).to(device)
    with torch.no_grad():  # as DDP does: every process starts from process 0's weights (a LoRA stage
        for tensor in [*replica.parameters(), *replica.buffers()]:  # draws its adapters from per-process RNGs)
            torch.distributed.broadcast(tensor, src=0)
    blocks = block_classes(replica)
    for module in list(replica.modules())[1:]:
        if type(module) in blocks:
            fully_shard(module, mp_policy=policy)
    fully_shard(replica, mp_policy=policy)
    return replica


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded one (a collective: every process must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_parameters(source: nn.Module, target: nn.Module, names: list[str]) -> None:
    """Copy the parameters ``names`` of the sharded ``source`` into the plain ``target`` (collective)."""
    params = dict(source.named_parameters())
    targets = dict(target.named_parameters())
    with torch.no_grad():
        for name in names:
            targets[name].copy_(full_tensor(params[name].detach()).to(targets[name].device))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str], sharded: bool) -> dict:
    """``optimizer.state_dict()`` as one process would have it: whole tensors, parameters by index in
    optimizer order (``names``). Sharded: gathered from every process (collective)."""
    if not sharded:
        return optimizer.state_dict()
    full = get_optimizer_state_dict(model, optimizer, options=FULL)
    index = {name: i for i, name in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, names: list[str], sharded: bool) -> None:
    """Load an :func:`optimizer_state` dict; sharded, every process keeps its shard of it."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    full = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full, options=FULL)

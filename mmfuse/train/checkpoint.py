"""Checkpoint files: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint is a directory ``checkpoints/step-XXXXXX/`` (the global optimizer step)::

    trainer_state.json      position (stage, step, epoch, batch), the run's config
    weights.safetensors     every parameter trained so far, LoRA adapters included, by full name
    optimizer.safetensors   optimizer state tensors, keyed "<param index>.<key>"
    optimizer.json          param_groups, non-tensor state, the parameter names in optimizer order
    scheduler.json          the LR scheduler's state_dict
    scaler.json             the fp16 grad scaler's state_dict (fp16 only)
    rng-<rank>.safetensors  torch CPU (and CUDA) RNG states of each process
    rng-<rank>.json         python ``random`` and numpy RNG states of each process

It is written into ``.step-XXXXXX.tmp/`` and renamed into place with ``os.replace``, so a directory
named ``step-XXXXXX`` is always complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def temp_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f".{checkpoint_name(step)}.tmp"


def start_checkpoint(root: str | Path, step: int) -> Path:
    """Create an empty temp directory for step ``step``, clearing leftovers of crashed saves."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale)
    tmp = temp_dir(root, step)
    tmp.mkdir()
    return tmp


def finish_checkpoint(root: str | Path, step: int, keep: int) -> Path:
    """Rename the temp directory into place, then delete all but the newest ``keep`` checkpoints."""
    final = Path(root) / checkpoint_name(step)
    os.replace(temp_dir(root, step), final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def save_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def save_weights(path: Path, params: list[tuple[str, nn.Parameter]]) -> None:
    save_file({name: p.detach().cpu().contiguous() for name, p in params}, path)


def load_weights(model: nn.Module, path: Path) -> None:
    """Copy saved tensors into ``model``'s parameters of the same names."""
    params = dict(model.named_parameters())
    saved = load_file(path)
    missing = sorted(set(saved) - set(params))
    if missing:
        raise ValueError(f"{path}: the model has no parameter(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def save_optimizer(directory: Path, state: dict, names: list[str]) -> None:
    """Write an ``optimizer.state_dict()``-shaped ``state`` over the parameters ``names``."""
    tensors, plain = {}, {}
    for index, entries in state["state"].items():
        plain[str(index)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[str(index)][key] = value
    save_file(tensors, directory / "optimizer.safetensors")
    meta = {"param_names": names, "param_groups": state["param_groups"], "state": plain}
    save_json(directory / "optimizer.json", meta)


def read_optimizer(directory: Path, optimizer: torch.optim.Optimizer, names: list[str]) -> dict:
    """The ``optimizer.state_dict()``-shaped state :func:`save_optimizer` wrote, checked against the
    parameters ``names`` that ``optimizer`` (built the same way) updates."""
    meta = load_json(directory / "optimizer.json")
    if meta["param_names"] != names:
        raise ValueError(f"{directory}: the optimizer was saved over other parameters than this stage trains")
    state = {int(i): dict(entries) for i, entries in meta["state"].items()}
    for key, tensor in load_file(directory / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    groups = [
        {k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()}  # JSON made tuples lists
        for saved, current in zip(meta["param_groups"], optimizer.param_groups, strict=True)
    ]
    return {"state": state, "param_groups": groups}


def save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, directory / f"rng-{rank}.safetensors")
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    save_json(
        directory / f"rng-{rank}.json",
        {"python": [version, list(internal), gauss_next], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]},
    )


def load_rng(directory: Path, rank: int) -> None:
    path = directory / f"rng-{rank}.safetensors"
    if not path.is_file():
        raise ValueError(f"{directory}: no RNG state for process {rank}; resume with the same number of processes")
    tensors = load_file(path)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    meta = load_json(directory / f"rng-{rank}.json")
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))

"""Measured costs of a model: parameters, training FLOPs per sample, cost against the number of media
tokens, and what adding a modality costs. Every figure is measured on the real model (FLOPs with
``torch.utils.flop_counter.FlopCounterMode``), never read from a config.
"""

from __future__ import annotations

import copy
import sys
import dataclasses
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from .config import CodecConfig, EncoderConfig, MultimodalConfig
from .data.schema import MARKERS, Message, Sample
from .model import MultimodalLM
from .modes import training_mode
from .train.config import StageConfig
from .train.stage import apply_stage, vocabulary_tables

# the world's encoder for a modality a recipe does not have yet (what adding it costs)
WORLD_ENCODERS = {
    "image": EncoderConfig(modality="image", name_or_path="world:vision", feature_layer=-2),
    "audio": EncoderConfig(modality="audio", name_or_path="world:audio"),
    "video": EncoderConfig(modality="video", name_or_path="world:vision", feature_layer=-2, frames=8),
}
# and its codec, for a Type-D recipe
WORLD_CODECS = {
    "image": CodecConfig(modality="image", name_or_path="world:image_codec"),
    "audio": CodecConfig(modality="audio", name_or_path="world:audio_codec"),
}


def train_flops(model: MultimodalLM, batch: dict[str, Any]) -> int:
    """FLOPs of one forward + backward pass on ``batch`` with the model's current trainable set.

    Gradients are cleared afterwards; the weights are not changed.
    """
    with training_mode(model, True), FlopCounterMode(display=False) as counter:
        loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], media=batch["media"]).loss
        if loss.requires_grad:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def train_flops_per_sample(model: MultimodalLM, stage: StageConfig, samples: list[Sample]) -> float:
    """Training FLOPs per sample of ``stage`` (its parameters made trainable) on ``samples``."""
    apply_stage(model, stage)
    batch = model.collator()([model.processor(s) for s in samples])
    return train_flops(model, batch) / len(samples)


def media_token_cost(
    model: MultimodalLM, stage: StageConfig, item: Any, modality: str, items_per_sample: tuple[int, ...] = (1, 2, 4, 8)
) -> list[dict[str, float]]:
    """Training FLOPs of one sample holding 1, 2, 4... copies of media ``item`` and a one-word answer:
    ``[{"items", "media_tokens", "train_flops"}]``; media tokens are the vectors the connector makes."""
    apply_stage(model, stage)
    per_item = model.media_token_count(modality, tuple(model.media_processors[modality](item).shape))
    out = []
    max_length, model.processor.max_length = model.processor.max_length, sys.maxsize  # a measurement, not training data
    try:
        for n in items_per_sample:
            sample = Sample(
                id=f"cost-{n}",
                messages=[Message("user", MARKERS[modality] * n + "\nDescribe."), Message("assistant", "yes")],
                media={modality: [item] * n},
            )
            batch = model.collator()([model.processor(sample)])
            out.append({"items": n, "media_tokens": n * per_item, "train_flops": train_flops(model, batch)})
    finally:
        model.processor.max_length = max_length
    return out


def parameter_summary(model: MultimodalLM) -> dict[str, int]:
    """``{"params_total", "params_llm", "params_encoders", "params_connectors", "params_codecs", "params_fusion"}``."""
    groups = model.parameter_groups()
    count = lambda prefix: sum(p.numel() for g, ps in groups.items() if g == prefix or g.startswith(prefix + ".") for _, p in ps)
    return {
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_llm": count("llm"),
        "params_encoders": count("encoders"),
        "params_connectors": count("connectors"),
        "params_codecs": count("codecs"),
        "params_fusion": count("fusion"),
    }


def trainable_parameters(model: MultimodalLM, stages: list[StageConfig]) -> int:
    """Parameters some stage trains (the union over stages; LoRA adapters count as they are added; an
    embedding trained only in its added rows counts those rows)."""
    trained: dict[int, int] = {}
    for stage in stages:
        rows = {id(table) for table in vocabulary_tables(model)} if stage.train_added_tokens else set()
        for p in apply_stage(model, stage):
            count = len(model.added_token_ids()) * p.shape[1] if id(p) in rows else p.numel()
            trained[id(p)] = max(trained.get(id(p), 0), count)
    return sum(trained.values())


def with_modality(config: MultimodalConfig, additions: dict[str, Any]) -> MultimodalConfig:
    """``config`` with ``additions`` (section -> its new entry: ``{"encoders": EncoderConfig, "connectors":
    ConnectorConfig}``, or ``{"codecs": CodecConfig}`` for Type-D) added under the entry's modality. A
    Type-D config forgets its resolved codebooks and feature widths, so the grown model lays out its
    vocabulary and its feature projections again."""
    modality = _modality(additions)
    if modality in config.encoders or modality in config.codecs:
        raise ValueError(f"the config already reads {modality}")
    out = copy.deepcopy(config)
    for section, entry in additions.items():
        getattr(out, section)[modality] = copy.deepcopy(entry)
    out.fusion.options.pop("codebooks", None)
    out.fusion.options.pop("feature_dims", None)  # a model reading features checks every codec's width again
    out.fusion.options.pop("code_start", None)  # a shared vocabulary finds room for the new codes again
    return out


def _modality(additions: dict[str, Any]) -> str:
    return (additions.get("codecs") or additions["encoders"]).modality


def adds_modality(model: MultimodalLM, additions: dict[str, Any]) -> dict[str, Any]:
    """What adding a modality to ``model`` costs (``additions`` as :func:`with_modality` takes them):
    parameters by component (the grown model is built and counted) and the recipe lines a user adds
    (the new config entries, defaults left out); ``{"modality", "error"}`` when the grown model cannot
    be built (its ValueError)."""
    after_config, modality = with_modality(model.config, additions), _modality(additions)
    try:
        with torch.random.fork_rng(devices=[]):
            after = MultimodalLM.from_config(after_config)
    except ValueError as err:  # the design cannot take it (a shared vocabulary with no room for the new codes)
        return {"modality": modality, "error": str(err)}
    before, grown = parameter_summary(model), parameter_summary(after)
    snippet = yaml.safe_dump(
        {section: {modality: _non_default(entry, keep=("modality", "kind"))} for section, entry in additions.items()},
        default_flow_style=False,
        sort_keys=False,
    )
    return {
        "modality": modality,
        "new_params": grown["params_total"] - before["params_total"],
        "new_params_by_component": {k.removeprefix("params_"): grown[k] - before[k] for k in before if k != "params_total"},
        "llm_params_changed": grown["params_llm"] != before["params_llm"],
        "config_lines": len(snippet.splitlines()),
        "config_added": snippet,
    }


def _non_default(config, keep: tuple[str, ...]) -> dict[str, Any]:
    """The fields of a dataclass config that differ from their defaults (plus ``keep``)."""
    default = type(config)()
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if (f.name in keep and hasattr(config, f.name))
        or (f.name not in ("hf_config", "settings") and getattr(config, f.name) != getattr(default, f.name))
    }

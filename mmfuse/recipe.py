"""Recipes: one YAML file per named model, picking components and a training schedule.

A recipe holds ``name``, ``survey_type`` ("A".."D"), ``description``, ``model`` (a
:class:`MultimodalConfig`), ``train`` (a :class:`TrainConfig`) and ``eval`` (datasets to score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import MultimodalConfig
from .train.config import TrainConfig

SURVEY_TYPES = ("A", "B", "C", "D")


@dataclass
class Recipe:
    name: str
    survey_type: str
    description: str
    model: MultimodalConfig
    train: TrainConfig
    eval: dict[str, Any] = field(default_factory=dict)


def _builtin_dir() -> Path:
    return Path(__file__).parent / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in _builtin_dir().glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a YAML file path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = _builtin_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown recipe {str(name_or_path)!r}; built-in recipes: {', '.join(list_recipes())}")
    where = f"recipe {path.name}"
    try:
        data = yaml.safe_load(path.read_text())  # plain data only: no tags that build Python objects
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: not a plain YAML recipe ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of recipe fields, got {type(data).__name__}")
    missing = sorted({"name", "survey_type", "model", "train"} - set(data))
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    if data["survey_type"] not in SURVEY_TYPES:
        raise ValueError(f"{where}: survey_type must be one of {SURVEY_TYPES}, got {data['survey_type']!r}")
    model = MultimodalConfig.from_dict(data["model"])
    if model.fusion.type != data["survey_type"]:
        raise ValueError(f"{where}: survey_type {data['survey_type']!r} but model.fusion.type {model.fusion.type!r}")
    return Recipe(
        name=data["name"],
        survey_type=data["survey_type"],
        description=" ".join(str(data.get("description", "")).split()),
        model=model,
        train=TrainConfig.from_dict({"output_dir": f"runs/{data['name']}", **data["train"]}),
        eval=data.get("eval", {}),
    )

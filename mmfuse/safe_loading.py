"""Safe loading: weights come from safetensors and settings from JSON (YAML through ``yaml.safe_load``).

Unpickling a file runs whatever code the file names, so pickle-based weights (``.bin``, ``.pt``,
``.pth``, ``.pkl``, ``.pickle``, ``.ckpt``) are never opened: :func:`require_safetensors` refuses them
with :class:`UnsafeCheckpoint`, whose message says how to convert them once.
"""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
CONVERT = (
    "convert it once, where you trust the file: python -c \"import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('{name}', weights_only=True), 'model.safetensors')\" (a transformers model: "
    "from_pretrained(dir).save_pretrained(dir), which writes safetensors)"
)


class UnsafeCheckpoint(ValueError):
    """A checkpoint whose weights are pickle-based; mmfuse loads safetensors only."""


def require_safetensors(path: str | Path, weights: str = "*.safetensors") -> None:
    """Refuse a pickle-based ``path``, or a directory that holds pickle-based weights and no ``weights``
    (a file name or glob pattern). Anything else passes: the caller reports what is missing."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpoint(f"{path} is a pickle-based file ({path.suffix}); mmfuse loads weights from safetensors only, "
                               f"because unpickling runs arbitrary code. {CONVERT.format(name=path.name)}")
    if not path.is_dir() or any(path.glob(weights)):
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise UnsafeCheckpoint(f"{path} holds pickle-based weights {pickled} and no {weights}; mmfuse loads weights from "
                               f"safetensors only, because unpickling runs arbitrary code. {CONVERT.format(name=pickled[0])}")

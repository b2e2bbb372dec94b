"""What a run's media features carry, apart from what its fusion makes of them.

A model that answers a question wrong may lack the information (its features do not carry it) or fail
to use it (the fusion does not route it to the answer). :func:`probe_features` separates the two. It
reads each sample's media features from the run, frozen:

- ``source="encoder"``: the encoder's output ``(tokens, d_enc)``, what the encoder offers;
- ``source="connector"``: the trained connector's output ``(tokens, d_llm)``, what the fusion receives.

A small probe (:class:`FeatureProbe`) is then trained to name the answer among the train split's
answers. It averages the features into one vector per item before it sees the question (with
``source="connector"``, exactly LLaMA-Adapter V1's global image feature), then an MLP reads that vector
with the question, given as a bag of its token ids.

Test predictions are scored by :func:`mmfuse.eval.tasks.qa_scores`: per kind and, on the world's
images, per number of objects in the scene. If the probe names the colour of the object a question
asks about and the model does not, the fusion is what fails.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.schema import Sample
from ..modes import one_cpu_thread, training_mode
from .tasks import qa_scores

SOURCES = ("encoder", "connector")


class FeatureProbe(nn.Module):
    """Features ``(n, tokens, d)``, averaged over tokens, and question ids ``(n, length)`` (``vocab_size``
    pads) -> answer logits ``(n, num_answers)``."""

    def __init__(self, feature_dim: int, vocab_size: int, num_answers: int, hidden: int = 256):
        super().__init__()
        self.feature = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.question = nn.EmbeddingBag(vocab_size + 1, hidden, mode="mean", padding_idx=vocab_size)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, num_answers))

    def forward(self, features: torch.Tensor, question_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.feature(features.mean(dim=1)), self.question(question_ids)], dim=-1))


def _one_item(sample: Sample) -> tuple[str, object]:
    """The sample's only media item, as (modality, item); other samples are a named error."""
    items = [(m, item) for m, listed in sample.media.items() for item in listed]
    if len(items) != 1:
        raise ValueError(f"sample {sample.id!r}: the probe reads samples with exactly one media item; it has {len(items)}")
    return items[0]


@torch.no_grad()
def media_features(model, samples: list[Sample], source: str = "connector", batch_size: int = 32) -> torch.Tensor:
    """``(len(samples), tokens, d)``: each sample's one media item through the run's encoder (and its
    connector, for ``source="connector"``), computed once per distinct file."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    pairs = [_one_item(s) for s in samples]
    modalities = {m for m, _ in pairs}
    if len(modalities) != 1:
        raise ValueError(f"the probe reads one modality at a time; the samples hold {sorted(modalities)}")
    modality = modalities.pop()
    if modality not in model.encoders:
        raise ValueError(f"the model has no {modality} encoder to probe (it has {sorted(model.encoders)})")
    keys = [str(item) if isinstance(item, (str, Path)) else f"#{i}" for i, (_, item) in enumerate(pairs)]  # files once
    distinct: dict[str, int] = {}  # each item's first sample
    for i, key in enumerate(keys):
        distinct.setdefault(key, i)
    order = list(distinct.values())
    process, device = model.media_processors[modality], next(model.parameters()).device
    out = []
    with training_mode(model, False):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            inputs = torch.stack([process(pairs[i][1], samples[i].id, 0) for i in chunk]).to(device)
            encoded: dict[str, torch.Tensor] = {}
            connected = model.encode_media({modality: inputs}, features=encoded)[modality]
            out.append((connected if source == "connector" else encoded[modality]).float().cpu())
    table = torch.cat(out)
    row = {key: r for r, key in enumerate(distinct)}
    return table[[row[key] for key in keys]]


def question_ids(tokenizer, samples: list[Sample], pad_id: int) -> torch.Tensor:
    """``(n, longest)`` token ids of each sample's prompt turns, padded with ``pad_id``."""
    ids = [tokenizer("\n".join(m.content for m in s.prompt_and_answer()[0]), add_special_tokens=False)["input_ids"]
           for s in samples]
    longest = max(map(len, ids))
    return torch.tensor([row + [pad_id] * (longest - len(row)) for row in ids])


def train_probe(features: torch.Tensor, questions: torch.Tensor, targets: torch.Tensor, vocab_size: int, num_answers: int,
                *, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> FeatureProbe:
    """Fit a :class:`FeatureProbe` with AdamW on ``(features, questions) -> targets`` (answer indices), on
    one CPU thread."""
    with torch.random.fork_rng(devices=[]), one_cpu_thread():
        torch.manual_seed(seed)
        probe = FeatureProbe(features.shape[-1], vocab_size, num_answers)
        optimizer = torch.optim.AdamW(probe.parameters(), lr=lr)
        for _ in range(steps):
            rows = torch.randint(0, len(targets), (min(batch_size, len(targets)),))
            loss = nn.functional.cross_entropy(probe(features[rows], questions[rows]), targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe.eval()


def probe_features(model, train: list[Sample], test: list[Sample], *, source: str = "connector", steps: int = 3000,
                   batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> dict:
    """Train a probe on ``train``'s features and questions, score it on ``test``: :func:`qa_scores`'s
    result plus ``source``, ``steps``, ``answers`` (the classes) and ``train_accuracy``. A
    test answer not among the train answers counts as wrong."""
    if not train or not test:
        raise ValueError(f"the probe needs train and test samples; got {len(train)} and {len(test)}")
    answers = sorted({s.prompt_and_answer()[1] for s in train})
    index = {a: i for i, a in enumerate(answers)}
    vocab_size = len(model.tokenizer)
    features = {"train": media_features(model, train, source), "test": media_features(model, test, source)}
    questions = {"train": question_ids(model.tokenizer, train, vocab_size), "test": question_ids(model.tokenizer, test, vocab_size)}
    targets = torch.tensor([index[s.prompt_and_answer()[1]] for s in train])
    probe = train_probe(features["train"], questions["train"], targets, vocab_size, len(answers), steps=steps,
                        batch_size=batch_size, lr=lr, seed=seed)
    with torch.no_grad():
        predicted = {split: probe(features[split], questions[split]).argmax(dim=-1) for split in features}
    result = qa_scores(test, [answers[i] for i in predicted["test"].tolist()])
    result.update(source=source, steps=steps, answers=answers,
                  train_accuracy=(predicted["train"] == targets).float().mean().item())
    return result

"""Type-D, tokenized early fusion (Chameleon, AudioPaLM, AnyGPT): a codec turns each media item into
discrete codes, which become tokens of an extended vocabulary, so the LLM reads and writes media as it
reads and writes text.

The vocabulary is extended at the id level (no added strings): after the LLM's ``text_vocab_size``
rows come, per modality, a begin and an end token and ``codebook_size * num_codebooks`` code rows.
Multi-codebook (residual) codes are flattened frame-major with one id range per codebook (AnyGPT's
``code + codebook_size * layer``). One media item is laid out as ``<boi> code ... code <eoi>``.

``vocabulary: shared`` is UniCode's unified codebook: a modality's codes are not new rows but text
ids (code ``c`` is text id ``code_start + c``, a block of the text vocabulary without special tokens),
so the LLM reads an image code through a word's embedding row and writes it through that word's
output row; only the begin and end tokens are added. A codec trained against those rows
(``world:unified_image_codec``, whose frozen codebook is the world LLM's embeddings of the block)
quantises images to words' vectors.

``read: features`` is LaVIT's released code: a media item the model only reads (outside the loss: a
prompt's image) enters as the codec's continuous features before quantization, through a linear
projection (LaVIT's ``vit_proj``), while an item the model writes (inside the loss, or generated)
stays code ids, the generation targets.

``write: features`` (with ``read: features``) is VL-GPT: every item, read or written, enters as its
projected continuous features, and at the positions of an item the model writes, a regression head on
the LLM's last hidden state predicts the next position's features (an L2 loss, ``regression_weight``
times, beside the LM loss of the text and the end token). Generating an item regresses its features one
position at a time, each fed back through the read projection, and the codec quantizes them to codes,
so a generated item leaves ``generate`` as ids like any other.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import MODALITIES
from ..data.processor import IGNORE_INDEX
from .base import FusionStrategy
from .embedding import PLACEHOLDER_IDS
from .layers import attention_heads, attention_module, decoder_layers

INITIALISATIONS = ("mean", "random")
LOSSES = ("all", "text")
READS = ("codes", "features")
WRITES = ("codes", "features")
VOCABULARIES = ("extended", "shared")


@dataclass(frozen=True)
class ModalityVocabulary:
    """The id range of one modality: ``begin``, ``end``, then ``num_codebooks`` ranges of codes;
    ``code_start``: where the codes start when they are shared text ids (UniCode) instead."""

    modality: str
    begin: int
    codebook_size: int
    num_codebooks: int
    code_start: int | None = None

    @property
    def end(self) -> int:
        return self.begin + 1

    @property
    def first_code(self) -> int:
        return self.begin + 2 if self.code_start is None else self.code_start

    @property
    def size(self) -> int:
        """Rows this modality adds to the vocabulary."""
        return 2 + (self.codebook_size * self.num_codebooks if self.code_start is None else 0)

    def code_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(items, frames, num_codebooks)`` -> ids ``(items, frames * num_codebooks)``, frame-major."""
        if codes.shape[-1] != self.num_codebooks:
            raise ValueError(f"{self.modality}: codes have {codes.shape[-1]} codebooks, the vocabulary {self.num_codebooks}")
        offsets = self.first_code + self.codebook_size * torch.arange(self.num_codebooks, device=codes.device)
        return (codes + offsets).flatten(1)

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids ``(frames * num_codebooks,)`` of one span -> codes ``(1, frames, num_codebooks)``;
        ValueError when an id is not this modality's code of the codebook its position needs."""
        relative = (ids - self.first_code).view(-1, self.num_codebooks)
        codebook = torch.arange(self.num_codebooks, device=ids.device)
        codes = relative - codebook * self.codebook_size
        if ((codes < 0) | (codes >= self.codebook_size)).any():
            raise ValueError(f"{self.modality}: the span holds ids that are not codes of the codebook their position needs")
        return codes.unsqueeze(0)

    def allowed(self, position: int) -> tuple[int, int]:
        """The id range ``[lo, hi)`` allowed at ``position`` (0-based) inside a span."""
        lo = self.first_code + (position % self.num_codebooks) * self.codebook_size
        return lo, lo + self.codebook_size


def vocabularies(text_vocab_size: int, codebooks: dict[str, list[int]], code_start: int | None = None) -> dict[str, ModalityVocabulary]:
    """modality -> its id range, modalities in :data:`MODALITIES` order after the text rows.
    ``codebooks``: modality -> ``[codebook_size, num_codebooks]``; ``code_start``: every modality's codes
    are the text ids from there (shared vocabulary), else each gets new rows."""
    out, start = {}, text_vocab_size
    for modality in [m for m in MODALITIES if m in codebooks]:
        size, depth = codebooks[modality]
        out[modality] = ModalityVocabulary(modality, start, int(size), int(depth), code_start)
        start += out[modality].size
    return out


def shared_code_start(text_vocab_size: int, special_ids: list[int], codes: int) -> int:
    """The start of the highest block of ``codes`` text ids holding no special token (a code must
    never read as the end of the reply or a chat marker); ValueError when the vocabulary has none."""
    end = text_vocab_size
    for special in sorted((i for i in set(special_ids) if 0 <= i < text_vocab_size), reverse=True):
        if end - special - 1 >= codes:
            break
        end = special
    if end < codes:  # no gap was wide enough, and the ids below the lowest special token are too few
        raise ValueError(f"vocabulary 'shared': no block of {codes} text ids without special tokens in a text "
                         f"vocabulary of {text_vocab_size}; use a smaller codebook or vocabulary 'extended'")
    return end - codes


class QKNorm(nn.Module):
    """Chameleon's ``qk_normalization``: LayerNorm over each head's query (or key) vector, with a
    weight and bias per head, applied to the projection's output ``(B, L, heads * head_dim)``."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.head_dim = (head_dim,)
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.unflatten(-1, self.weight.shape), self.head_dim)
        return torch.addcmul(self.bias, normed, self.weight).flatten(-2)  # one fused op for the affine part


def _normalised_projection(projection: nn.Module, norm: QKNorm, x: torch.Tensor) -> torch.Tensor:
    """A query or key projection's own forward, then ``norm``: set as the projection's ``forward``, so the
    norm runs inline as in Chameleon's attention, without the forward-hook path on every decode step."""
    return norm.forward(type(projection).forward(projection, x))


class TokenFusion(FusionStrategy):
    """Options: ``loss`` "all" (media codes are learned wherever the text around them is, so the model
    can generate media) or "text" (codes are read, never learned); ``init`` of the new rows: "mean"
    (transformers' mean resizing: drawn around the text rows' mean with their covariance) or "random"
    (the LLM's initializer); ``qk_norm`` (Chameleon: LayerNorm on queries and keys per head; it changes
    the LLM's function, so it is for training from scratch); ``generation_seconds``: the length of an
    audio item the model generates; ``read``: "codes" (every item is read as its code ids) or
    "features" (LaVIT; see the module docstring); ``write``: "codes" (a written item is learned and
    generated as code ids) or "features" (VL-GPT: regressed, with ``regression_weight`` on its loss); ``vocabulary``: "extended" (new rows for the codes) or
    "shared" (UniCode: the codes are text ids from ``code_start``). ``text_vocab_size``, ``codebooks``,
    ``code_start`` (shared) and, when reading features, ``feature_dims`` (modality -> the codec's
    feature width) are filled in by the model from the LLM, its tokenizer and the codecs."""

    survey_type = "D"

    def __init__(self, text_vocab_size: int, codebooks: dict[str, list[int]], loss: str = "all", init: str = "mean",
                 qk_norm: bool = False, generation_seconds: float = 2.0, read: str = "codes",
                 feature_dims: dict[str, int] | None = None, vocabulary: str = "extended", code_start: int | None = None,
                 write: str = "codes", regression_weight: float = 1.0):
        super().__init__()
        if vocabulary not in VOCABULARIES:
            raise ValueError(f"fusion.options.vocabulary must be one of {VOCABULARIES}, got {vocabulary!r}")
        if (vocabulary == "shared") != (code_start is not None):
            raise ValueError(f"fusion.options.code_start is the shared vocabulary's first code id: give it with "
                             f"vocabulary 'shared' only (vocabulary {vocabulary!r}, code_start {code_start!r})")
        if read not in READS:
            raise ValueError(f"fusion.options.read must be one of {READS}, got {read!r}")
        if write not in WRITES:
            raise ValueError(f"fusion.options.write must be one of {WRITES}, got {write!r}")
        if write == "features" and (read != "features" or loss != "all"):
            raise ValueError(f"fusion.options.write 'features' (VL-GPT) regresses the features the model reads: it needs "
                             f"read 'features' and loss 'all', got read {read!r} and loss {loss!r}")
        if loss not in LOSSES:
            raise ValueError(f"fusion.options.loss must be one of {LOSSES}, got {loss!r}")
        if init not in INITIALISATIONS:
            raise ValueError(f"fusion.options.init must be one of {INITIALISATIONS}, got {init!r}")
        self.text_vocab_size = text_vocab_size
        self.vocabularies = vocabularies(text_vocab_size, codebooks, code_start)
        for vocab in self.vocabularies.values():
            if code_start is not None and not 0 <= code_start <= text_vocab_size - vocab.codebook_size * vocab.num_codebooks:
                raise ValueError(f"fusion.options.code_start {code_start}: the {vocab.modality} codes "
                                 f"({vocab.codebook_size * vocab.num_codebooks}) do not fit in the {text_vocab_size} text ids from there")
        self.output_modalities = ("text", *self.vocabularies)
        self.loss = loss
        self.init = init
        self.qk_norm = qk_norm
        self.generation_seconds = generation_seconds
        self.qk_norms = nn.ModuleList()
        self.reads_features = read == "features"
        self.feature_dims = dict(feature_dims or {})
        self.read_projections = nn.ModuleDict()
        self.writes_features = write == "features"
        self.regression_weight = regression_weight
        self.regression_heads = nn.ModuleDict()

    @property
    def vocab_size(self) -> int:
        """Rows of the extended vocabulary."""
        return self.text_vocab_size + sum(v.size for v in self.vocabularies.values())

    @property
    def labels_media(self) -> bool:
        return self.loss == "all"

    def added_vocabulary(self) -> range:
        return range(self.text_vocab_size, self.vocab_size)

    def layout(self, modality: str, num_tokens: int) -> list[int]:
        vocab = self.vocabularies[modality]
        return [vocab.begin, *[PLACEHOLDER_IDS[modality]] * num_tokens, vocab.end]

    def attach(self, llm: nn.Module, media_dims: dict[str, int]) -> None:
        """Grow the embedding and LM head (tied when the LLM ties them) to :attr:`vocab_size` rows;
        a model saved extended is left as it is. Adds the qk-norms when asked."""
        rows = llm.get_input_embeddings().num_embeddings
        if rows == self.text_vocab_size:
            llm.resize_token_embeddings(self.vocab_size, mean_resizing=self.init == "mean")
        elif rows != self.vocab_size:
            raise ValueError(f"the LLM has {rows} embedding rows; Type-D fusion expects {self.text_vocab_size} "
                             f"(text) or {self.vocab_size} (text + media codes)")
        if self.reads_features:
            for modality, vocab in self.vocabularies.items():
                if vocab.num_codebooks != 1 or not self.feature_dims.get(modality):
                    raise ValueError(f"fusion.options.read 'features' needs single-codebook codecs with continuous features; "
                                     f"the {modality} codec has {vocab.num_codebooks} codebooks and feature width "
                                     f"{self.feature_dims.get(modality, 0)}")
                width = llm.get_input_embeddings().embedding_dim
                self.read_projections[modality] = nn.Linear(self.feature_dims[modality], width)
                if self.writes_features:
                    self.regression_heads[modality] = nn.Linear(width, self.feature_dims[modality])
        if self.qk_norm:
            heads = attention_heads(llm)
            for layer in decoder_layers(llm):
                attention = attention_module(layer)
                kv_heads = attention.k_proj.out_features // attention.head_dim
                for projection, n in ((attention.q_proj, heads), (attention.k_proj, kv_heads)):
                    self.qk_norms.append(QKNorm(n, attention.head_dim))
                    # a partial, not a closure: a deep copy of the model copies it with the projection and the norm
                    projection.forward = functools.partial(_normalised_projection, projection, self.qk_norms[-1])

    def media_ids(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
        """``input_ids`` with each modality's codes ``(items, frames, codebooks)`` written, as vocabulary
        ids and in order, at its placeholder positions; ValueError when the counts differ."""
        for modality, vocab in self.vocabularies.items():
            mask = input_ids == PLACEHOLDER_IDS[modality]
            codes = media.get(modality)
            ids = vocab.code_ids(codes).flatten() if codes is not None else input_ids.new_zeros(0)
            n_positions = int(mask.sum())
            if n_positions != ids.numel():
                raise ValueError(f"{modality}: the batch has {n_positions} code positions but the codec produced "
                                 f"{ids.numel()} codes; the processor's layout and the media do not match")
            if n_positions:
                input_ids = input_ids.masked_scatter(mask, ids.to(input_ids.dtype))
        return input_ids

    def llm_inputs(self, llm, input_ids, media, features=None, written=None):
        """-> ``{"input_ids": (B, L)}``: the LLM reads the codes through its (extended) embedding table.

        Reading features (LaVIT) it also gives ``"inputs_embeds" (B, L, d)``, what the LLM reads, where
        the positions of the items not ``written`` (a ``(B, L)`` bool mask; None: every item is read)
        hold ``features`` (modality -> ``(items, frames, feature_dim)``, items in marker order) projected;
        the ids stay for the labels and for constrained decoding. Writing features (VL-GPT) every item is
        read as features, and ``"feature_targets"`` holds, per modality with written positions, their
        ``(B, L)`` mask and the ``(n, feature_dim)`` features there (for :meth:`regression_loss`)."""
        ids = self.media_ids(input_ids, media)
        if not self.reads_features:
            return {"input_ids": ids}
        embeds = llm.get_input_embeddings()(ids)
        targets = {}
        for modality, projection in self.read_projections.items():
            positions = input_ids == PLACEHOLDER_IDS[modality]
            if modality not in (features or {}) or not positions.any():
                continue
            rows = features[modality].flatten(0, 1)  # one row per position, in position order
            read = positions if written is None or self.writes_features else positions & ~written
            embeds = embeds.masked_scatter(read.unsqueeze(-1), projection(rows[read[positions]].to(projection.weight.dtype)).to(embeds.dtype))
            if self.writes_features and written is not None and (positions & written).any():
                targets[modality] = (positions & written, rows[written[positions]])
        return {"input_ids": ids, "inputs_embeds": embeds, **({"feature_targets": targets} if targets else {})}

    def regression_loss(self, hidden: torch.Tensor, targets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """VL-GPT's L2 loss, summed over the written positions like the LM loss over its tokens: the
        regression head on the last hidden state ``hidden`` ``(B, L, d)`` at each position predicts the
        features at the next one, where ``targets`` (``llm_inputs``'s ``"feature_targets"``) has them;
        each position adds ``regression_weight`` times its squared L2 distance to the features there."""
        total = hidden.new_zeros((), dtype=torch.float32)
        for modality, (mask, values) in targets.items():
            predicted = self.regression_heads[modality](hidden[:, :-1][mask[:, 1:]])  # a position 0 is never a code
            total = total + F.mse_loss(predicted.float(), values.float(), reduction="sum")
        return self.regression_weight * total

    def labels(self, labels: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Labels with the placeholder positions the processor labelled set to the codes read there (to
        the ignore index when the features there are regressed instead)."""
        placeholders = torch.isin(labels, torch.tensor(list(PLACEHOLDER_IDS.values()), device=labels.device))
        return torch.where(placeholders, IGNORE_INDEX if self.writes_features else inputs["input_ids"], labels)

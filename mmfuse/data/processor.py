"""The processor: a :class:`Sample` to model inputs.

It renders the conversation with the tokenizer's chat template (a plain ``User:/Assistant:`` template
when the tokenizer has none), puts labels only on the assistant's turns (including the token that ends
the turn), loads every media item, and expands each marker into exactly the positions the fusion
strategy's layout asks for, with the count computed from the encoder + connector's real output.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jinja2.exceptions import TemplateError

from ..config import TEXT_PROMPT
from .badsamples import BadSample, BadSampleLog, Skipped, check_policy
from .media import MediaProcessor
from .prompts import MARKER_OR_PROMPT_RE, PROMPT_MARKER, route_prompts
from .schema import END_OF_CHUNK, MARKER_RE, MARKERS, Message, Sample

IGNORE_INDEX = -100
_MODALITY_OF = {**{marker: modality for modality, marker in MARKERS.items()}, PROMPT_MARKER: TEXT_PROMPT}

PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% elif m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% else %}User: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


@dataclass
class Encoded:
    """One processed sample: token ids, labels, and per modality a ``(items, ...)`` tensor."""

    id: str
    input_ids: list[int]
    labels: list[int]
    media: dict[str, torch.Tensor] = field(default_factory=dict)


class SampleTooLong(BadSample):
    """A sample does not fit ``max_length`` (never truncated: truncation could cut a media span)."""


class Processor:
    """Callable ``(sample, for_generation=False) -> Encoded | Skipped``.

    ``count_tokens(modality, item_shape)`` returns how many vectors the connector yields for one item
    of that input shape; ``layout(modality, n)`` returns the ids standing for it.
    ``on_bad_sample``: for a sample that cannot be used (unreadable media, marker/media mismatch, longer
    than ``max_length``: :class:`SampleTooLong`, ...), "error" raises the :class:`BadSample`; "skip"
    returns a :class:`Skipped` record and adds it to ``self.bad_samples`` (print
    ``self.bad_samples.summary()`` at the end of a run; in a loader worker the records reach the main
    process in ``batch["skipped"]``). ``label_media``: media inside a learned span keep their layout ids
    as labels (Type-D learns to generate them; the strategy turns placeholder labels into codes).
    ``task_prefixes``: ``meta["task"]`` -> text put before the first user turn (AudioPaLM's ``[ASR]``).
    With a ``text_prompt`` media processor, every user turn's text goes to the text encoder as a prefix
    instead of into the token ids (:func:`~mmfuse.data.prompts.route_prompts`).
    """

    def __init__(
        self,
        tokenizer,
        media_processors: dict[str, MediaProcessor],
        count_tokens: Callable[[str, tuple[int, ...]], int],
        layout: Callable[[str, int], list[int]],
        *,
        max_length: int = 512,
        chat_template: str | None = None,
        on_bad_sample: str = "error",
        label_media: bool = False,
        task_prefixes: dict[str, str] | None = None,
    ):
        self.tokenizer = tokenizer
        self.media_processors = media_processors
        self.count_tokens = count_tokens
        self.layout = layout
        self.max_length = max_length
        self.chat_template = chat_template or tokenizer.chat_template or PLAIN_TEMPLATE
        self.on_bad_sample = check_policy(on_bad_sample)
        self.label_media = label_media
        self.task_prefixes = dict(task_prefixes or {})
        self.bad_samples = BadSampleLog()
        self.stop_token_ids = self._stop_token_ids()

    # -- text ---------------------------------------------------------------------------------
    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def assistant_spans(self, sample_id: str, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of each assistant turn (with its end token)."""
        text = self.render(messages)
        spans = []
        for i, msg in enumerate(messages):
            if msg.role != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            end_text = self.render(messages[: i + 1])
            if not text.startswith(end_text) or not end_text.startswith(prompt):
                raise ValueError(
                    f"sample {sample_id!r}: the chat template does not render conversations prefix by prefix, so "
                    "assistant turns cannot be located; set chat_template in the model config"
                )
            spans.append((len(prompt), max(len(prompt), len(end_text.rstrip()))))  # trailing whitespace is not learned
        return text, spans

    def document_spans(self, sample: Sample) -> tuple[str, list[tuple[int, int]]]:
        """A document's text (after the BOS token) and the character spans that get labels, as in
        OpenFlamingo's MMC4 masking: the text after each media marker up to and including the
        ``<|endofchunk|>`` that closes it. Text before the first marker and between an
        ``<|endofchunk|>`` and the next marker is not learned (nor are the markers)."""
        text = (self.tokenizer.bos_token or "") + sample.messages[0].content
        markers = [(m.start(), m.end()) for m in MARKER_RE.finditer(text)]
        if not markers:
            raise BadSample.of(sample.id, "text", "has no media marker; a document is learned only from the text that "
                               "follows its media", kind="nothing to learn")
        spans = []
        for (_, start), (following, _) in zip(markers, [*markers[1:], (len(text), len(text))]):
            close = text.find(END_OF_CHUNK, start, following)
            spans.append((start, close + len(END_OF_CHUNK) if close >= 0 else following))
        return text, spans

    def _stop_token_ids(self) -> list[int]:
        """Ids that end an assistant turn: the tokenizer's EOS, the template's end-of-turn token, and
        ``<|endofchunk|>`` when the vocabulary has it (it ends a document's chunk)."""
        ids = {self.tokenizer.eos_token_id, self.tokenizer.get_vocab().get(END_OF_CHUNK)} - {None}
        probe = [Message("user", "hi"), Message("assistant", "ok")]
        full = self.render(probe)
        prompt = self.render(probe[:1], add_generation_prompt=True)
        reply = full[len(prompt):] if full.startswith(prompt) else ""
        tail = reply[reply.find("ok") + len("ok"):] if "ok" in reply else ""  # the template may put a space before it
        tail_ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
        if tail_ids:
            ids.add(tail_ids[0])
        return sorted(ids)

    # -- samples ------------------------------------------------------------------------------
    def __call__(self, sample: Sample, for_generation: bool = False) -> Encoded | Skipped:
        try:
            return self._encode(sample, for_generation)
        except BadSample as err:
            if self.on_bad_sample == "error":
                raise
            return self.bad_samples.record(err)

    def _encode(self, sample: Sample, for_generation: bool) -> Encoded:
        sample.validate()
        sample = self.with_task_prefix(sample)
        routes = TEXT_PROMPT in self.media_processors
        if routes:
            sample = route_prompts(sample)
        missing = sorted({m for m, items in sample.media.items() if items} - set(self.media_processors))
        if missing:
            raise BadSample.of(sample.id, missing[0], f"has media but the model has no {missing[0]} encoder", kind="no encoder")
        media = {
            modality: [self.media_processors[modality](item, sample.id, i) for i, item in enumerate(items)]
            for modality, items in sample.media.items()
            if items
        }
        try:
            text, spans = self._text_and_spans(sample, for_generation)
        except TemplateError as err:  # e.g. a template that insists on alternating roles
            raise BadSample.of(sample.id, "conversations", f"the chat template refuses it ({err})") from err

        input_ids: list[int] = []
        labels: list[int] = []
        next_item = {m: 0 for m in media}
        for piece_start, piece_end, modality in self._pieces(text, spans, MARKER_OR_PROMPT_RE if routes else MARKER_RE):
            if modality is None:
                ids = self.tokenizer(text[piece_start:piece_end], add_special_tokens=False)["input_ids"]
                inside = any(s <= piece_start and piece_end <= e for s, e in spans)
                input_ids += ids
                labels += ids if inside else [IGNORE_INDEX] * len(ids)
                continue
            item = media[modality][next_item[modality]]
            next_item[modality] += 1
            ids = self.layout(modality, self.count_tokens(modality, tuple(item.shape)))
            input_ids += ids
            learned = self.label_media and any(s <= piece_start and piece_end <= e for s, e in spans)
            labels += ids if learned else [IGNORE_INDEX] * len(ids)

        if not for_generation and all(label == IGNORE_INDEX for label in labels):
            what = "no text follows its media" if sample.is_document else "the assistant turns produced no tokens"
            raise BadSample.of(sample.id, "labels", f"every label is masked; {what}", kind="nothing to learn")
        if len(input_ids) > self.max_length:
            raise SampleTooLong.of(
                sample.id, "input_ids", f"{len(input_ids)} tokens (media included) exceed max_length {self.max_length}; "
                "raise max_length or set on_bad_sample='skip' (samples are never truncated)", kind="too long"
            )
        stacked = {m: torch.stack(items) for m, items in media.items()}
        return Encoded(sample.id, input_ids, labels, stacked)

    def _text_and_spans(self, sample: Sample, for_generation: bool) -> tuple[str, list[tuple[int, int]]]:
        """The text to tokenize and the character spans that get labels."""
        if sample.is_document and for_generation:  # generation continues the document as it stands
            return (self.tokenizer.bos_token or "") + sample.messages[0].content, []
        if sample.is_document:
            return self.document_spans(sample)
        if sample.messages[0].role == "assistant":
            raise BadSample.of(sample.id, "conversations[0]", "the conversation starts with an assistant turn; nothing "
                               "prompts it")
        if for_generation:
            messages, _ = sample.prompt_and_answer() if sample.messages[-1].role == "assistant" else (sample.messages, "")
            return self.render(messages, add_generation_prompt=True), []
        text, spans = self.assistant_spans(sample.id, sample.messages)
        if not spans:
            raise BadSample.of(sample.id, "conversations", "has no assistant turn to learn from", kind="nothing to learn")
        return text, spans

    def with_task_prefix(self, sample: Sample) -> Sample:
        """``sample`` with its task's prefix before its first user turn (unchanged without one)."""
        prefix = self.task_prefixes.get(sample.meta.get("task"))
        first = next((i for i, m in enumerate(sample.messages) if m.role in ("user", "document")), None)
        if not prefix or first is None:
            return sample
        messages = list(sample.messages)
        messages[first] = Message(messages[first].role, prefix + messages[first].content)
        return Sample(sample.id, messages, sample.media, sample.meta)

    @staticmethod
    def _pieces(text: str, spans: list[tuple[int, int]], markers_re: re.Pattern = MARKER_RE):
        """Split ``text`` at media markers (``markers_re``) and assistant-span edges: ``(start, end, modality | None)``.

        Text pieces are tokenized separately, so the prompt is tokenized exactly as at generation
        time and each answer as it would be generated.
        """
        markers = [(m.start(), m.end(), _MODALITY_OF[m.group()]) for m in markers_re.finditer(text)]
        cuts = sorted({0, len(text), *(p for span in spans for p in span), *(p for a, b, _ in markers for p in (a, b))})
        marker_at = {a: (b, modality) for a, b, modality in markers}
        for a, b in zip(cuts, cuts[1:]):
            if a in marker_at:
                yield a, b, marker_at[a][1]
            elif a < b:
                yield a, b, None

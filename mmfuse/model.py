"""MultimodalLM: an LLM, one encoder and connector per modality, and a fusion strategy.

    media[m] -> encoders[m] -> connectors[m] -> fusion strategy -> Hugging Face causal LM
    media[m] -> codecs[m] -> codes -> Type-D vocabulary tokens -> Hugging Face causal LM -> codecs[m].decode

A checkpoint directory holds ``config.json`` + ``model.safetensors`` + the tokenizer files + one
media processor per modality under ``processors/<m>/``; loading never unpickles.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_model, save_model
from torch import nn

from .backbones.encoders import MediaEncoder
from .backbones.loading import (
    add_tokens,
    config_dict,
    load_encoder_model,
    load_llm,
    load_media_processor,
    load_tokenizer,
    saved_processor,
)
from .backbones.multi import MultiEncoder, with_extra_encoders
from . import codecs as mmfuse_codecs
from .codecs.base import MediaCodec
from .config import TEXT_PROMPT, MultimodalConfig
from .connectors import Connector
from .data.collate import Collator
from .data.media import MediaProcessor
from .data.processor import IGNORE_INDEX, Processor
from .data.schema import MARKERS, Sample
from .fusion import build_fusion
from .fusion.constraints import MediaSpans, split_media_spans
from .fusion.tokens import shared_code_start
from .safe_loading import require_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class MultimodalLM(nn.Module):
    """The composed model. Build with :meth:`from_config` (backbones named in the config) or
    :meth:`from_pretrained` (a saved mmfuse checkpoint)."""

    def __init__(self, config: MultimodalConfig, llm, encoders: dict[str, MediaEncoder], tokenizer, media_processors,
                 codecs: dict[str, MediaCodec] | None = None):
        super().__init__()
        self.config = config
        self.llm = llm
        self.encoders = nn.ModuleDict(encoders)
        self.codecs = nn.ModuleDict(codecs or {})
        llm_dim = llm.get_input_embeddings().embedding_dim
        if config.fusion.type == "D":
            self._resolve_vocabulary(config.fusion.options, llm, tokenizer)
        self.fusion = build_fusion(config.fusion, {m: enc.hidden_size for m, enc in encoders.items()})
        widths = {m: self.fusion.connector_width(enc.hidden_size, llm_dim) for m, enc in encoders.items()}
        self.connectors = nn.ModuleDict({m: Connector(config.connectors[m], enc.hidden_size, widths[m],
                                                      parts=enc.widths if isinstance(enc, MultiEncoder) else (), llm=llm)
                                         for m, enc in encoders.items()})
        self.fusion.attach(llm, widths)
        self.tokenizer = tokenizer
        self.media_processors = media_processors
        self._token_counts: dict[tuple, int] = {}
        self._span_lengths: dict[str, int] = {}
        self.processor = Processor(
            tokenizer,
            media_processors,
            self.media_token_count,
            self.fusion.layout,
            max_length=config.max_length,
            chat_template=config.chat_template,
            on_bad_sample=config.on_bad_sample,
            label_media=self.fusion.labels_media,
            task_prefixes=config.task_prefixes,
        )

    def _resolve_vocabulary(self, options: dict, llm, tokenizer) -> None:
        """Type-D: record the LLM's text rows and each codec's codebooks (and feature widths, when the
        fusion reads features; and the first code id, when the codes share the text vocabulary) in the
        fusion options (once, so a saved model rebuilds the same id layout and projections); a saved
        layout that disagrees with the codecs raises."""
        options.setdefault("text_vocab_size", llm.get_input_embeddings().num_embeddings)
        codebooks = {m: [codec.codebook_size, codec.num_codebooks] for m, codec in self.codecs.items()}
        saved = options.setdefault("codebooks", codebooks)
        if {m: list(v) for m, v in saved.items()} != codebooks:
            raise ValueError(f"fusion.options.codebooks {saved} do not match the codecs' {codebooks}")
        if options.get("vocabulary") == "shared" and self.codecs:
            declared = {m: c.text_ids_start for m, c in self.codecs.items() if c.text_ids_start is not None}
            if len(set(declared.values())) > 1:
                raise ValueError(f"vocabulary 'shared': the codecs were trained against different text ids {declared}")
            codes = max(size * depth for size, depth in codebooks.values())
            start = next(iter(declared.values()), None)
            if start is None:
                start = shared_code_start(options["text_vocab_size"], tokenizer.all_special_ids, codes)
            if options.setdefault("code_start", start) != start:
                raise ValueError(f"fusion.options.code_start {options['code_start']} differs from {start}, where the codecs' "
                                 f"codes {'were trained as' if declared else 'fit as'} text ids")
        if options.get("read") == "features":
            dims = {m: codec.feature_dim for m, codec in self.codecs.items()}
            if options.setdefault("feature_dims", dims) != dims:
                raise ValueError(f"fusion.options.feature_dims {options['feature_dims']} do not match the codecs' {dims}")
        if options.get("write") == "features":
            unable = [m for m, codec in self.codecs.items() if type(codec).quantize_features is MediaCodec.quantize_features]
            if unable:
                raise ValueError(f"fusion.options.write 'features': the {unable} codec(s) cannot quantize regressed features "
                                 f"back to codes, so what the model writes could not be decoded")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: MultimodalConfig) -> "MultimodalLM":
        """Build from backbones named in ``config`` (pretrained weights when paths are given)."""
        config = copy.deepcopy(config)
        llm = load_llm(config.llm)
        tokenizer = load_tokenizer(config.llm)
        add_tokens(llm, tokenizer, config.llm.add_tokens)
        config.llm.hf_config = config_dict(llm.config)
        encoders, processors = _encoders(config)
        codecs = {}
        for modality, codec_cfg in config.codecs.items():
            if codec_cfg.name_or_path is None and codec_cfg.settings is None:
                raise ValueError(f"codecs.{modality}: give either name_or_path or settings")
            codecs[modality] = (mmfuse_codecs.load_codec(codec_cfg.name_or_path) if codec_cfg.name_or_path
                                else mmfuse_codecs.build_codec(codec_cfg.settings))
            codec_cfg.settings = codecs[modality].settings()
            processors[modality] = MediaProcessor(modality, codecs[modality].processor(), pad_to_square=False)
        return cls(config, llm, encoders, tokenizer, processors, codecs)

    @staticmethod
    def is_checkpoint(directory: str | Path) -> bool:
        """Whether ``directory`` holds a :meth:`save_pretrained` checkpoint (not, say, a plain HF model,
        which also has ``config.json`` and ``model.safetensors``)."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            return False
        return "mmfuse_version" in json.loads((directory / CONFIG_NAME).read_text())

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "MultimodalLM":
        """Load a checkpoint written by :meth:`save_pretrained` (JSON + safetensors only; pickle-based
        weights are refused with :class:`~mmfuse.safe_loading.UnsafeCheckpoint`)."""
        directory = Path(directory)
        require_safetensors(directory, WEIGHTS_NAME)
        if not cls.is_checkpoint(directory):
            raise FileNotFoundError(
                f"{directory} is not an mmfuse checkpoint: it needs {WEIGHTS_NAME} and a {CONFIG_NAME} written by save_pretrained"
            )
        config = MultimodalConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text())["model"])
        llm = load_llm(config.llm)
        tokenizer = load_tokenizer(config.llm, fallback=str(directory))
        add_tokens(llm, tokenizer, config.llm.add_tokens)  # saved with them: nothing to add
        encoders, processors = _encoders(config, directory)
        codecs = {m: mmfuse_codecs.build_codec(c.settings) for m, c in config.codecs.items()}
        for modality in codecs:
            processors[modality] = MediaProcessor(modality, saved_processor(modality, str(directory / "processors" / modality)),
                                                  pad_to_square=False)
        model = cls(config, llm, encoders, tokenizer, processors, codecs)
        load_model(model, str(directory / WEIGHTS_NAME), strict=True)
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.llm.hf_config = config_dict(self.llm.config)
        payload = {"mmfuse_version": 1, "survey_type": self.fusion.survey_type, "model": config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        save_model(self, str(directory / WEIGHTS_NAME))
        self.tokenizer.save_pretrained(str(directory))
        for modality, processor in self.media_processors.items():
            processor.save_pretrained(directory / "processors" / modality)

    def train(self, mode: bool = True) -> "MultimodalLM":
        """As ``nn.Module.train``, except that Type-D codecs stay in eval mode: they are frozen
        tokenizers, and a VQ codebook in training mode would move with every batch it encodes."""
        super().train(mode)
        self.codecs.eval()
        return self

    # -- components -------------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by component: ``llm`` (``llm.embeddings``: the input embeddings, ``llm.head``: an
        untied output layer, ``llm.norms``: the normalisation layers, ``llm``: the rest),
        ``encoders.<m>``, ``connectors.<m>``, ``codecs.<m>``, ``fusion.<part>`` (the fusion module's children, e.g.
        ``fusion.blocks``, ``fusion.prompts``). A stage's ``train: [fusion]`` selects every ``fusion.*``."""
        embeddings = {id(p) for p in self.llm.get_input_embeddings().parameters()}
        head = {id(p) for p in (self.llm.get_output_embeddings() or nn.Identity()).parameters()} - embeddings
        norms = {id(p) for m in self.llm.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)}
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, param in self.named_parameters():
            head_name = name.split(".", 2)
            if head_name[0] == "llm":
                key = ("llm.embeddings" if id(param) in embeddings else "llm.head" if id(param) in head
                       else "llm.norms" if id(param) in norms else "llm")
            else:
                key = f"{head_name[0]}.{head_name[1]}"
            groups.setdefault(key, []).append((name, param))
        return groups

    def added_token_ids(self) -> list[int]:
        """Vocabulary ids of the tokens ``llm.add_tokens`` added, and the fusion's (Type-D media codes)."""
        return self.tokenizer.convert_tokens_to_ids(list(self.config.llm.add_tokens)) + list(self.fusion.added_vocabulary())

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """``{group: {"total": n, "trainable": n}}`` plus an ``all`` row."""
        counts = {}
        for group, params in self.parameter_groups().items():
            counts[group] = {
                "total": sum(p.numel() for _, p in params),
                "trainable": sum(p.numel() for _, p in params if p.requires_grad),
            }
        counts["all"] = {k: sum(c[k] for c in counts.values()) for k in ("total", "trainable")}
        return counts

    def collator(self, padding_side: str = "right") -> Collator:
        return Collator(self.tokenizer.pad_token_id, padding_side)

    def media_token_count(self, modality: str, item_shape: tuple[int, ...]) -> int:
        """Vectors the encoder + connector produce for one item of input shape ``item_shape``.

        Measured by running them once on zeros (cached per shape); RNG state is left untouched.
        """
        key = (modality, item_shape)
        if modality in self.codecs:
            return self.codecs[modality].num_frames(item_shape) * self.codecs[modality].num_codebooks
        if key not in self._token_counts:
            if modality not in self.encoders:
                raise ValueError(f"the model has no {modality} encoder; it has {sorted(self.encoders)}")
            device = next(self.parameters()).device
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                probe = torch.zeros((1, *item_shape), device=device, dtype=self._encoder_dtype(modality))
                self._token_counts[key] = self._connect(modality, probe, self.encoders[modality](probe)).shape[1]
        return self._token_counts[key]

    def _encoder_dtype(self, modality: str) -> torch.dtype:
        if modality == TEXT_PROMPT:  # token ids
            return torch.long
        return next(self.encoders[modality].parameters()).dtype

    def _codec_dtype(self, modality: str) -> torch.dtype:
        return next(self.codecs[modality].parameters()).dtype

    def _connect(self, modality: str, inputs: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Run the connector; video inputs ``(n, frames, 3, H, W)`` tell it their number of frames."""
        if modality == "video":
            return self.connectors[modality](features, frames=inputs.shape[1])
        return self.connectors[modality](features)

    # -- forward ----------------------------------------------------------------------------------
    def encode_media(self, media: dict[str, torch.Tensor], features: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """modality -> ``(items, tokens, d_llm)``; a frozen encoder runs without autograd. A Type-D
        modality -> its codes ``(items, frames, codebooks)``. ``features``, when given, receives each
        encoder's output before the connector ``(items, tokens, d_enc)`` and each codec's continuous
        features ``(items, frames, feature_dim)``."""
        out = {}
        for modality, inputs in media.items():
            if modality in self.codecs:
                codec, inputs = self.codecs[modality], inputs.to(self._codec_dtype(modality))
                with torch.no_grad():
                    if features is None:
                        out[modality] = codec.encode(inputs)
                    else:
                        out[modality], features[modality] = codec.encode_with_features(inputs)
                continue
            if modality not in self.encoders:
                raise ValueError(f"batch has {modality} media but the model has no {modality} encoder")
            encoder = self.encoders[modality]
            trainable = any(p.requires_grad for p in encoder.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
                encoded = encoder(inputs.to(self._encoder_dtype(modality)))
            if features is not None:
                features[modality] = encoded
            out[modality] = self._connect(modality, inputs, encoded)
        return out

    def can_embed(self, modality: str) -> bool:
        """Whether :meth:`embed_media` works for ``modality`` (an encoder, or a codec with features)."""
        return modality in self.encoders or (modality in self.codecs and self.codecs[modality].feature_dim > 0)

    @torch.no_grad()
    def embed_media(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """Processed items ``(n, ...)`` -> ``(n, d)``: the mean over positions of the modality's encoder
        features, or (Type-D) of its codec's continuous features; what retrieval compares."""
        if modality in self.codecs:
            return self.codecs[modality].features(inputs.to(self._codec_dtype(modality))).float().mean(dim=1)
        if modality not in self.encoders:
            raise ValueError(f"embed: the model has no {modality} encoder or codec; it has {sorted([*self.encoders, *self.codecs])}")
        return self.encoders[modality](inputs.to(self._encoder_dtype(modality))).float().mean(dim=1)

    def llm_inputs(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor] | None,
                   labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The fusion's keyword arguments for the LLM. A fusion that reads features also gets them: the
        codecs' continuous features (LaVIT) or the encoders' outputs before the connector (a Type-A
        branch, CogAgent), and which positions the model writes (``labels``'s labelled ones; none without labels)."""
        media = media or {}
        if not self.fusion.reads_features:
            return self.fusion.llm_inputs(self.llm, input_ids, self.encode_media(media))
        features = {}
        encoded = self.encode_media(media, features)
        written = None if labels is None else labels != IGNORE_INDEX
        return self.fusion.llm_inputs(self.llm, input_ids, encoded, features=features, written=written)

    def forward(self, input_ids, attention_mask=None, labels=None, media=None, ids=None, num_items_in_batch=None, skipped=None,
                **llm_kwargs):
        """Logits ``(B, L, vocab)`` and, with ``labels``, the next-token loss on labelled positions (plus
        the fusion's auxiliary loss, e.g. an MoE balance loss).

        ``num_items_in_batch``: the labelled positions of the whole global batch (all processes and
        micro-batches); the loss is then this batch's summed token loss over it, and the auxiliary loss
        is weighted by this batch's share of the labelled positions, so that summing the losses of
        every part of a global batch gives the loss of the global batch in one piece. ``ids`` and
        ``skipped`` are the collator's bookkeeping (sample ids, records of skipped samples), unused here."""
        try:
            inputs = self.llm_inputs(input_ids, media, labels)
        except ValueError as err:
            raise ValueError(f"batch {ids or '?'}: {err}") from err
        if labels is not None:
            labels = self.fusion.labels(labels, inputs)
        if num_items_in_batch is not None:
            llm_kwargs["num_items_in_batch"] = num_items_in_batch
        targets = inputs.pop("feature_targets", None)  # VL-GPT: features regressed where the model writes an item
        if "inputs_embeds" in inputs:  # the ids were for the labels; the LLM reads the embeddings
            inputs = {k: v for k, v in inputs.items() if k != "input_ids"}
        if targets:
            llm_kwargs["output_hidden_states"] = True
        output = self.llm(attention_mask=attention_mask, labels=labels, **inputs, **llm_kwargs)
        if targets and output.loss is not None:  # each written position weighs as one labelled token
            regression = self.fusion.regression_loss(output.hidden_states[-1], targets)
            if num_items_in_batch is not None:  # the LM loss is already a sum over num_items_in_batch
                output.loss = output.loss + regression / num_items_in_batch
            else:
                text = (labels[:, 1:] != IGNORE_INDEX).sum()
                written = sum(int(mask.sum()) for mask, _ in targets.values())
                output.loss = ((output.loss * text if text else 0) + regression) / (text + written)
        auxiliary = self.fusion.auxiliary_loss()
        if output.loss is not None and auxiliary is not None:
            if num_items_in_batch is not None:
                auxiliary = auxiliary * (labels[:, 1:] != IGNORE_INDEX).sum() / num_items_in_batch
            output.loss = output.loss + auxiliary
        return output

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, media=None, ids=None, labels=None, skipped=None, outputs=("text",),
                 **generate_kwargs):
        """New token ids ``(B, new)``. Media are encoded once; the LLM's KV cache does the rest.

        Takes the batch from ``collator(padding_side="left")``; ``generate_kwargs`` go to
        ``transformers`` ``generate`` (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``,
        ``streamer``, ``use_cache``, ``guidance_scale``...). ``outputs``: what the reply may hold, of
        ``fusion.output_modalities``. A Type-D model constrains decoding with :class:`MediaSpans`: media
        tokens only where ``outputs`` allow them, inside a span only its codes, exactly the span's length,
        then its end token; ``outputs=("image",)`` starts the reply with an image (its begin token is
        appended to the prompt and returned with the new tokens).
        """
        unknown = sorted(set(outputs) - set(self.fusion.output_modalities))
        if unknown or not outputs:
            raise ValueError(f"outputs {list(outputs)}: this model generates {list(self.fusion.output_modalities)}")
        if self.fusion.writes_features and outputs != ("text",):
            if len(outputs) != 1:
                raise ValueError(f"outputs {list(outputs)}: a model that writes features (VL-GPT) generates text, or one "
                                 f"media item as the whole reply")
            return self._write_features(input_ids, attention_mask, media, outputs[0], **generate_kwargs)
        generate_kwargs.setdefault("eos_token_id", self.processor.stop_token_ids)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        forced = None
        if self.codecs:
            eos = generate_kwargs["eos_token_id"]
            spans = MediaSpans(self.fusion.vocabularies, {m: self.span_length(m) for m in self.codecs}, outputs,
                               eos if isinstance(eos, list) else [eos])
            if "text" not in outputs and len(outputs) == 1:  # the reply is one media item: open its span
                forced = input_ids.new_full((input_ids.shape[0], 1), self.fusion.vocabularies[outputs[0]].begin)
        with self.fusion.generation_inputs(self.llm_inputs(input_ids, media)) as inputs:
            if self.codecs:  # a text-only reply from a prompt outside spans: one constant mask instead of MediaSpans
                static = spans.static(inputs["input_ids"], self.llm.get_output_embeddings().out_features) if "input_ids" in inputs else None
                generate_kwargs["logits_processor"] = [*generate_kwargs.get("logits_processor", []), static or spans]
            if forced is not None:
                inputs["input_ids"] = torch.cat([inputs["input_ids"], forced], dim=1)
                if "inputs_embeds" in inputs:  # read features (LaVIT): the prompt is read as embeddings, ids kept alongside
                    inputs["inputs_embeds"] = torch.cat([inputs["inputs_embeds"], self.llm.get_input_embeddings()(forced)], dim=1)
                attention_mask = None if attention_mask is None else torch.cat([attention_mask, torch.ones_like(forced)], dim=1)
            tokens = self.llm.generate(attention_mask=attention_mask, **inputs, **generate_kwargs)
        if "input_ids" in inputs:  # transformers returns the prompt too when it was given as ids
            tokens = tokens[:, inputs["input_ids"].shape[1]:]
        return tokens if forced is None else torch.cat([forced, tokens], dim=1)

    def _write_features(self, input_ids, attention_mask, media, modality: str, max_new_tokens: int | None = None,
                        do_sample: bool = False, **unsupported) -> torch.Tensor:
        """VL-GPT's image generation: ``(B, span + 2)`` ids, the begin token, the codes of the item and its
        end token. After the begin token the regression head's output at the last position is the next
        position's features, fed back through the read projection (KV cache kept); the codec quantizes the
        ``span`` regressed vectors to codes. Deterministic; ``max_new_tokens`` cuts the ids, as ``generate`` would."""
        unsupported = {k: v for k, v in unsupported.items() if k not in ("eos_token_id", "pad_token_id")}
        if do_sample or unsupported:
            raise ValueError(f"a model that writes features (VL-GPT) regresses an item's features deterministically; "
                             f"it takes max_new_tokens only, got {sorted(unsupported) + ['do_sample'] * do_sample}")
        vocab, span = self.fusion.vocabularies[modality], self.span_length(modality)
        begin = input_ids.new_full((input_ids.shape[0], 1), vocab.begin)
        inputs = self.llm_inputs(torch.cat([input_ids, begin], dim=1), media)
        mask = torch.ones_like(inputs["input_ids"]) if attention_mask is None else torch.cat([attention_mask, torch.ones_like(begin)], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first token
        step = self.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=mask, position_ids=positions,
                        use_cache=True, output_hidden_states=True)
        regressed = []
        for index in range(span):
            regressed.append(self.fusion.regression_heads[modality](step.hidden_states[-1][:, -1]))  # (B, feature_dim)
            if index + 1 < span:
                mask, positions = torch.cat([mask, torch.ones_like(begin)], 1), positions[:, -1:] + 1
                embeds = self.fusion.read_projections[modality](regressed[-1]).unsqueeze(1)
                step = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                cache=step.cache, use_cache=True, output_hidden_states=True)
        codes = self.codecs[modality].quantize_features(torch.stack(regressed, 1).to(self._codec_dtype(modality)))
        ids = torch.cat([begin, vocab.code_ids(codes), torch.full_like(begin, vocab.end)], dim=1)
        return ids if max_new_tokens is None else ids[:, :max_new_tokens]

    def span_length(self, modality: str) -> int:
        """Tokens between a generated item's begin and end tokens: one image at the processor's size,
        one audio clip of ``fusion.options.generation_seconds``."""
        if modality in self._span_lengths:
            return self._span_lengths[modality]
        processor = self.media_processors[modality]
        if modality == "audio":
            blank = np.zeros(round(self.fusion.generation_seconds * processor.sampling_rate), dtype=np.float32)
        else:
            blank = Image.new("RGB", (32, 32))  # the processor resizes it to its own size
        shape = tuple(processor(blank if modality != "video" else [blank] * processor.frames).shape)
        self._span_lengths[modality] = self.media_token_count(modality, shape)
        return self._span_lengths[modality]

    def decode_output(self, tokens: torch.Tensor) -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
        """Generated ids ``(B, new)`` -> per row ``(text, [(modality, media), ...])``: the text with a
        marker (``<image>``) where each complete media span was, and each span decoded by its codec
        (image ``(3, H, W)`` in [0, 1], audio ``(samples,)``). An unfinished span is dropped from both."""
        out = []
        for row in tokens:
            pieces, media = split_media_spans(row, getattr(self.fusion, "vocabularies", {}))
            text = "".join(self.tokenizer.decode(p, skip_special_tokens=True) if isinstance(p, torch.Tensor) else MARKERS[p[0]]
                           for p in pieces)
            decoded = [(m, self.codecs[m].decode(self.fusion.vocabularies[m].codes(ids))[0]) for m, ids in media]
            out.append((text.strip(), decoded))
        return out

    def answer(self, samples: list[Sample], **generate_kwargs) -> list[str]:
        """Generate the assistant's reply for each sample (its final assistant turn, if any, is dropped);
        a Type-D model's generated media show as markers (see :meth:`decode_output`)."""
        batch = self.collator("left")([self.processor(s, for_generation=True) for s in samples])
        device = next(self.parameters()).device
        tokens = self.generate(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            {m: t.to(device) for m, t in batch["media"].items()},
            **generate_kwargs,
        )
        return [text for text, _ in self.decode_output(tokens)]


def _encoders(config: MultimodalConfig, checkpoint: Path | None = None) -> tuple[dict[str, nn.Module], dict[str, MediaProcessor]]:
    """Each modality's encoder (with its ``extra`` encoders, WavLLM) and media processor; the processors
    come from ``checkpoint/processors/<m>`` when loading a checkpoint. Building afresh fills each
    encoder config's ``hf_config``, so the checkpoint rebuilds the same encoder."""
    encoders, processors = {}, {}
    for modality, enc_cfg in config.encoders.items():
        model = load_encoder_model(enc_cfg)
        saved = None if checkpoint is None else checkpoint / "processors" / modality
        hf_processor = load_media_processor(enc_cfg, model.config, directory=None if saved is None else str(saved))
        processors[modality] = MediaProcessor(modality, hf_processor, pad_to_square=enc_cfg.pad_to_square, frames=enc_cfg.frames,
                                              max_tokens=enc_cfg.max_tokens)
        if checkpoint is None:
            enc_cfg.hf_config = config_dict(model.config)
        encoders[modality] = MediaEncoder(enc_cfg, model)
        if enc_cfg.extra:  # WavLLM: more encoders over the same clips
            encoders[modality], processors[modality] = with_extra_encoders(enc_cfg, encoders[modality], processors[modality], saved)
    return encoders, processors

"""Type-D tokenized early fusion: vocabulary extension, code layout and labels, constrained decoding."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_LLMS, tiny_config
from transformers import AutoModelForCausalLM, LlamaConfig, LogitsProcessor

from mmfuse.config import CodecConfig, FusionConfig
from mmfuse.data.processor import IGNORE_INDEX
from mmfuse.data.schema import Message, Sample
from mmfuse.fusion.constraints import MediaSpans, split_media_spans
from mmfuse.fusion.embedding import PLACEHOLDER_IDS
from mmfuse.codecs.image import ImageCodec
from mmfuse.fusion.tokens import ModalityVocabulary, TokenFusion, shared_code_start
from mmfuse.model import MultimodalLM
from mmfuse.train.config import StageConfig
from mmfuse.train.stage import apply_stage, optimizer_groups

TINY_IMAGE_CODEC = {"kind": "image", "quantizer": "vq", "image_size": 16, "downsample": 4, "widths": [16, 16], "latent_dim": 8,
                    "codebook_size": 16, "codebook_dim": 4}
TEXT_ROWS = 320
IMAGE_CODES = 16  # (16 / 4) ** 2 cells, one codebook


def token_config(tokenizer_dir, tie: bool = False, **options):
    config = tiny_config(tokenizer_dir, image=None, vocab_size=TEXT_ROWS, fusion=FusionConfig(type="D", options=options),
                         codecs={"image": CodecConfig(modality="image", settings=dict(TINY_IMAGE_CODEC))})
    config.llm.hf_config["tie_word_embeddings"] = tie
    return config


def draw_sample(media_dir) -> Sample:
    return Sample("draw", [Message("user", "draw a red circle"), Message("assistant", "<image>")], {"image": [media_dir / "a.png"]})


def look_sample(media_dir) -> Sample:
    return Sample("look", [Message("user", "<image> what colour?"), Message("assistant", "red")], {"image": [media_dir / "a.png"]})


@pytest.mark.parametrize("tie", [False, True])
def test_extended_model_on_pure_text_gives_the_base_llms_logits(tokenizer_dir, tie):
    model = MultimodalLM.from_config(token_config(tokenizer_dir, tie=tie)).eval()
    vocab = model.fusion.vocabularies["image"]
    assert (vocab.begin, vocab.end, vocab.first_code) == (TEXT_ROWS, TEXT_ROWS + 1, TEXT_ROWS + 2)
    assert model.llm.get_input_embeddings().num_embeddings == TEXT_ROWS + 2 + IMAGE_CODES
    assert model.llm.get_output_embeddings().weight.shape[0] == TEXT_ROWS + 2 + IMAGE_CODES
    base = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in TINY_LLMS["llama"].items() if k != "model_type"},
                                                        vocab_size=TEXT_ROWS, tie_word_embeddings=tie)).eval()
    state = {k: v[:TEXT_ROWS] if v.shape[0] == model.fusion.vocab_size else v for k, v in model.llm.state_dict().items()}
    base.load_state_dict(state)
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        extended = model.llm(input_ids=ids).logits
        torch.testing.assert_close(extended[..., :TEXT_ROWS], base(input_ids=ids).logits)


def test_image_codes_are_read_as_tokens_and_learned_where_the_answer_is(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(token_config(tokenizer_dir)).eval()
    encoded = model.processor(draw_sample(media_dir))
    begin = encoded.input_ids.index(TEXT_ROWS)
    assert encoded.input_ids[begin: begin + IMAGE_CODES + 2] == [TEXT_ROWS, *[PLACEHOLDER_IDS["image"]] * IMAGE_CODES, TEXT_ROWS + 1]
    batch = model.collator()([encoded])
    inputs = model.llm_inputs(batch["input_ids"], batch["media"])
    codes = model.codecs["image"].encode(batch["media"]["image"])[0, :, 0]
    span = inputs["input_ids"][0, begin + 1: begin + 1 + IMAGE_CODES]
    assert torch.equal(span, codes + TEXT_ROWS + 2)
    labels = model.fusion.labels(batch["labels"], inputs)
    assert torch.equal(labels[0, begin: begin + IMAGE_CODES + 2], inputs["input_ids"][0, begin: begin + IMAGE_CODES + 2])
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    # a question about an image: the codes are read but never learned
    asked = model.collator()([model.processor(look_sample(media_dir))])
    read = model.fusion.labels(asked["labels"], model.llm_inputs(asked["input_ids"], asked["media"]))
    assert (read[asked["input_ids"] == PLACEHOLDER_IDS["image"]] == IGNORE_INDEX).all()


def test_text_loss_leaves_generated_media_unlearned(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(token_config(tokenizer_dir, loss="text"))
    encoded = model.processor(draw_sample(media_dir))
    learned = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert learned == [model.tokenizer.convert_tokens_to_ids("<|end|>")]  # only the turn's end token


def test_multi_codebook_codes_are_flattened_frame_major_with_a_range_per_codebook():
    vocab = ModalityVocabulary("audio", 100, codebook_size=10, num_codebooks=3)
    codes = torch.tensor([[[1, 2, 3], [4, 5, 6]]])
    ids = vocab.code_ids(codes)
    assert ids.tolist() == [[103, 114, 125, 106, 117, 128]]
    assert torch.equal(vocab.codes(ids[0]), codes)
    assert vocab.allowed(4) == (112, 122)
    with pytest.raises(ValueError, match="codebook"):
        vocab.codes(torch.tensor([103, 103, 125]))  # a first-codebook id where the second codebook belongs


class Boost(LogitsProcessor):
    """Pushes ``ids`` far above every other token (what an untrained model might prefer)."""

    def __init__(self, ids):
        self.ids = list(ids)

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.ids] += 100.0
        return scores


def test_media_spans_rule_position_by_position():
    vocab = ModalityVocabulary("audio", 10, codebook_size=3, num_codebooks=2)  # begin 10, end 11, codes 12-17
    spans = MediaSpans({"audio": vocab}, {"audio": 4}, ("text", "audio"), stop_ids=[1])
    scores = torch.zeros(1, 18)

    def allowed(prefix):
        return (spans(torch.tensor([prefix]), scores)[0] > float("-inf")).nonzero().flatten().tolist()

    assert allowed([5, 10]) == [12, 13, 14]  # first codebook
    assert allowed([5, 10, 12]) == [15, 16, 17]  # second codebook
    assert allowed([5, 10, 12, 15, 13, 16]) == [11]  # the span is full: only its end
    assert allowed([5, 10, 12, 15, 13, 16, 11]) == list(range(10)) + [10]  # text again, or a new item
    text_only = MediaSpans({"audio": vocab}, {"audio": 4}, ("text",), stop_ids=[1])
    assert (text_only(torch.tensor([[5]]), scores)[0] > float("-inf")).nonzero().flatten().tolist() == list(range(10))
    media_only = MediaSpans({"audio": vocab}, {"audio": 4}, ("audio",), stop_ids=[1])
    assert (media_only(torch.tensor([[5, 10, 12, 15, 13, 16, 11]]), scores)[0] > float("-inf")).nonzero().flatten().tolist() == [1, 10]


def test_constrained_generation_never_crosses_modalities(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(token_config(tokenizer_dir)).eval()
    media_ids = list(model.fusion.added_vocabulary())
    batch = model.collator("left")([model.processor(look_sample(media_dir), for_generation=True)] * 2)
    args = (batch["input_ids"], batch["attention_mask"], batch["media"])
    # the unconstrained LLM, pushed towards media ids, emits them: the check below can fail
    raw = model.llm.generate(input_ids=model.llm_inputs(batch["input_ids"], batch["media"])["input_ids"],
                             attention_mask=batch["attention_mask"], max_new_tokens=4, do_sample=False,
                             logits_processor=[Boost(media_ids)], pad_token_id=0)
    assert (raw[:, batch["input_ids"].shape[1]:] >= TEXT_ROWS).all()
    text = model.generate(*args, max_new_tokens=6, do_sample=False, logits_processor=[Boost(media_ids)])
    assert (text < TEXT_ROWS).all()
    # asked for an image and pushed towards text: exactly one span of codes, then its end
    image = model.generate(*args, outputs=("image",), max_new_tokens=IMAGE_CODES + 3, do_sample=False,
                           logits_processor=[Boost(range(200))])
    vocab = model.fusion.vocabularies["image"]
    for row in image.tolist():
        assert row[0] == vocab.begin and row[IMAGE_CODES + 1] == vocab.end
        assert all(vocab.first_code <= t < vocab.first_code + IMAGE_CODES for t in row[1: IMAGE_CODES + 1])
        assert row[IMAGE_CODES + 2] in model.processor.stop_token_ids
    text_out, items = model.decode_output(image)[0]
    assert text_out == "<image>" and items[0][0] == "image" and items[0][1].shape == (3, 16, 16)
    assert 0 <= items[0][1].min() and items[0][1].max() <= 1


def test_a_learned_query_codec_reads_and_draws_images_as_its_query_codes(tokenizer_dir, media_dir):
    config = token_config(tokenizer_dir)
    config.codecs["image"].settings.update(num_queries=4, query_depth=1, query_heads=2)  # SEED's 1-D causal codes
    model = MultimodalLM.from_config(config).eval()
    vocab = model.fusion.vocabularies["image"]
    batch = model.collator("left")([model.processor(look_sample(media_dir), for_generation=True)])
    ids = model.llm_inputs(batch["input_ids"], batch["media"])["input_ids"][0].tolist()
    begin = ids.index(vocab.begin)
    assert ids[begin + 5] == vocab.end and all(vocab.first_code <= t < vocab.first_code + IMAGE_CODES for t in ids[begin + 1: begin + 5])
    image = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], outputs=("image",),
                           max_new_tokens=8, do_sample=False, logits_processor=[Boost(range(200))])[0].tolist()
    assert image[0] == vocab.begin and image[5] == vocab.end  # exactly the codec's 4 codes
    _, items = model.decode_output(torch.tensor([image]))[0]
    assert items[0][0] == "image" and items[0][1].shape == (3, 16, 16)


def redraw_sample(media_dir) -> Sample:  # reads one image, writes another
    return Sample("redraw", [Message("user", "<image> draw it again"), Message("assistant", "<image>")],
                  {"image": [media_dir / "a.png", media_dir / "b.png"]})


def test_lavit_reads_prompt_images_as_features_and_writes_images_as_codes(tokenizer_dir, media_dir, tmp_path):
    model = MultimodalLM.from_config(token_config(tokenizer_dir, read="features")).eval()
    assert model.config.fusion.options["feature_dims"] == {"image": 8}  # the codec's latent width
    batch = model.collator()([model.processor(redraw_sample(media_dir))])
    passes = []
    hook = model.codecs["image"].encoder.register_forward_hook(lambda *_: passes.append(1))
    inputs = model.llm_inputs(batch["input_ids"], batch["media"], batch["labels"])
    hook.remove()
    assert len(passes) == 1  # codes and features from one pass of the codec's encoder
    placeholders = (batch["input_ids"][0] == PLACEHOLDER_IDS["image"]).nonzero().flatten()
    read, written = placeholders[:IMAGE_CODES], placeholders[IMAGE_CODES:]
    codec = model.codecs["image"]
    features = model.fusion.read_projections["image"](codec.features(batch["media"]["image"]))
    embeds, table = inputs["inputs_embeds"][0], model.llm.get_input_embeddings()
    torch.testing.assert_close(embeds[read], features[0])  # the prompt's image: projected continuous features
    torch.testing.assert_close(embeds[written], table(inputs["input_ids"][0, written]))  # the answer's: its code ids
    assert torch.equal(inputs["input_ids"][0, written], codec.encode(batch["media"]["image"])[1, :, 0] + TEXT_ROWS + 2)
    labels = model.fusion.labels(batch["labels"], inputs)
    assert (labels[0, read] == IGNORE_INDEX).all() and torch.equal(labels[0, written], inputs["input_ids"][0, written])
    other = torch.equal(table(inputs["input_ids"][0, read]), embeds[read])
    assert not other  # not the read image's code embeddings
    with torch.no_grad():  # and the LLM reads the embeddings, not the ids
        torch.testing.assert_close(model(**batch).logits, model.llm(inputs_embeds=inputs["inputs_embeds"],
                                                                    attention_mask=batch["attention_mask"]).logits)
    # retrieval compares the same features, averaged (CM3Leon's few-shot retrieval for a tokenized model)
    assert model.can_embed("image") and not model.can_embed("audio")
    torch.testing.assert_close(model.embed_media("image", batch["media"]["image"]), codec.features(batch["media"]["image"]).mean(1))
    # without labels (generation) every item is read as features
    unlabelled = model.llm_inputs(batch["input_ids"], batch["media"])["inputs_embeds"][0]
    assert torch.allclose(unlabelled[written], features[1])
    # the projection learns with the LLM (group "fusion"); the codec stays out
    apply_stage(model, StageConfig(name="s", train=["fusion", "llm"], data=["d"], steps=1, lr=1e-2))
    model.train()(**batch).loss.backward()
    assert model.fusion.read_projections["image"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in codec.parameters())
    model.eval().save_pretrained(tmp_path / "ckpt")
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_lavit_generation_reads_the_prompt_as_features_and_draws_codes(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(token_config(tokenizer_dir, read="features")).eval()
    batch = model.collator("left")([model.processor(look_sample(media_dir), for_generation=True)] * 2)
    args = (batch["input_ids"], batch["attention_mask"], batch["media"])
    kwargs = {"outputs": ("image",), "max_new_tokens": IMAGE_CODES + 3, "do_sample": False}
    image = model.generate(*args, use_cache=True, **kwargs)
    torch.testing.assert_close(image, model.generate(*args, use_cache=False, **kwargs))
    vocab = model.fusion.vocabularies["image"]
    assert image[0, 0] == vocab.begin and image[0, IMAGE_CODES + 1] == vocab.end
    assert ((image[:, 1: IMAGE_CODES + 1] >= vocab.first_code) & (image[:, 1: IMAGE_CODES + 1] < vocab.first_code + IMAGE_CODES)).all()
    with torch.no_grad():  # the prompt's image reaches the model through its features
        shifted = {"image": batch["media"]["image"].flip(-1)}
        assert not torch.equal(model.llm_inputs(batch["input_ids"], shifted)["inputs_embeds"],
                               model.llm_inputs(batch["input_ids"], batch["media"])["inputs_embeds"])
    with pytest.raises(ValueError, match="read must be one of"):
        MultimodalLM.from_config(token_config(tokenizer_dir, read="pixels"))


def test_cached_and_uncached_generation_give_the_same_tokens(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(token_config(tokenizer_dir)).eval()
    batch = model.collator("left")([model.processor(look_sample(media_dir), for_generation=True),
                                    model.processor(Sample("t", [Message("user", "hi")]), for_generation=True)])
    args = (batch["input_ids"], batch["attention_mask"], batch["media"])
    kwargs = {"outputs": ("text", "image"), "max_new_tokens": 24, "do_sample": False}
    torch.testing.assert_close(model.generate(*args, use_cache=True, **kwargs), model.generate(*args, use_cache=False, **kwargs))


def test_split_media_spans_keeps_text_around_complete_spans():
    vocab = ModalityVocabulary("image", 50, codebook_size=4, num_codebooks=1)
    pieces, media = split_media_spans(torch.tensor([7, 8, 50, 52, 53, 51, 9, 50, 52]), {"image": vocab})
    assert [p.tolist() if isinstance(p, torch.Tensor) else p for p in pieces] == [[7, 8], ("image",), [9]]
    assert [(m, ids.tolist()) for m, ids in media] == [("image", [52, 53])]  # the unfinished span is dropped


def test_save_and_load_keep_the_vocabulary_and_the_codec(tokenizer_dir, media_dir, tmp_path):
    model = MultimodalLM.from_config(token_config(tokenizer_dir)).train()
    batch = model.collator()([model.processor(draw_sample(media_dir))])
    codes = model.codecs["image"].encode(batch["media"]["image"])
    model(**batch)  # in training mode: the frozen codec must not update its codebook
    assert not model.codecs["image"].training
    assert torch.equal(model.codecs["image"].encode(batch["media"]["image"]), codes)
    model.eval().save_pretrained(tmp_path / "ckpt")
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.llm.get_input_embeddings().num_embeddings == model.fusion.vocab_size
    assert loaded.config.fusion.options["text_vocab_size"] == TEXT_ROWS
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    assert torch.equal(loaded.codecs["image"].encode(batch["media"]["image"]), model.codecs["image"].encode(batch["media"]["image"]))


def test_a_saved_layout_that_disagrees_with_the_codec_is_an_error(tokenizer_dir):
    config = token_config(tokenizer_dir)
    config.fusion.options["codebooks"] = {"image": [32, 1]}
    with pytest.raises(ValueError, match="do not match the codecs"):
        MultimodalLM.from_config(config)


@pytest.mark.parametrize("tie", [False, True])
def test_train_added_tokens_moves_only_the_new_rows(tokenizer_dir, media_dir, tie):
    model = MultimodalLM.from_config(token_config(tokenizer_dir, tie=tie))
    stage = StageConfig(name="rows", train=[], data=["d"], steps=1, train_added_tokens=True, lr=1e-2)
    params = apply_stage(model, stage)
    optimizer = torch.optim.AdamW(optimizer_groups(model, params, stage))
    before = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
    batch = model.collator()([model.processor(draw_sample(media_dir))])
    model(**batch).loss.backward()
    optimizer.step()
    new = list(model.fusion.added_vocabulary())
    for name, param in model.llm.named_parameters():
        if param.shape[0] == model.fusion.vocab_size:  # the embedding and (untied) head
            assert torch.equal(param[:TEXT_ROWS], before[name][:TEXT_ROWS]), name
            assert not torch.equal(param[new], before[name][new]), name
        else:
            assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("init", ["mean", "random"])
def test_new_rows_start_at_the_text_rows_mean_or_at_random(init):
    llm = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in TINY_LLMS["llama"].items() if k != "model_type"},
                                                       vocab_size=TEXT_ROWS, tie_word_embeddings=True))
    with torch.no_grad():
        llm.get_input_embeddings().weight.add_(1.0)
    fusion = TokenFusion(TEXT_ROWS, {"image": [64, 1]}, init=init)
    fusion.attach(llm, {})
    new_mean = llm.get_input_embeddings().weight[TEXT_ROWS:].mean().item()
    assert abs(new_mean - 1.0) < 0.1 if init == "mean" else abs(new_mean) < 0.1


def test_qk_norm_normalises_queries_and_keys_and_survives_a_deep_copy(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(token_config(tokenizer_dir, qk_norm=True)).eval()
    assert len(model.fusion.qk_norms) == 2 * TINY_LLMS["llama"]["num_hidden_layers"]
    attention = model.llm.model.layers[0].self_attn
    queries = attention.q_proj(torch.randn(1, 3, 32) * 5).view(1, 3, 4, -1)
    torch.testing.assert_close(queries.mean(-1), torch.zeros(1, 3, 4), atol=1e-5, rtol=0)
    batch = model.collator()([model.processor(draw_sample(media_dir))])
    with torch.no_grad():
        original = model(**batch).logits
        twin = copy.deepcopy(model)
        for p in twin.fusion.qk_norms.parameters():
            p.add_(torch.randn_like(p))
        assert (twin(**batch).logits - original).abs().max() > 1e-4
        torch.testing.assert_close(model(**batch).logits, original)


WORLD_SIZE_CODEC = {"kind": "image", "quantizer": "vq", "image_size": 48, "downsample": 8, "widths": [16, 16, 16], "latent_dim": 8,
                    "codebook_size": 16, "codebook_dim": 4}


class KnownProbe:
    """Says every item shows a red circle."""

    def predict(self, items):
        return {"colour": ["red"] * len(items), "shape": ["circle"] * len(items)}


def _draw(sid, colour, shape):
    return Sample(sid, [Message("user", f"Draw the image: a large {colour} {shape} in the middle."), Message("assistant", "<image>")],
                  {"image": ["unused.png"]}, {"task": "image_generation", "target": {"colour": colour, "shape": shape}})


def test_generation_scores_count_an_item_right_only_when_every_judged_attribute_is(monkeypatch):
    from mmfuse.eval import probes, tasks

    monkeypatch.setattr(probes, "load_probe", lambda modality: KnownProbe())
    monkeypatch.setattr(probes, "probe_metrics", lambda modality: {"colour": 1.0})
    samples = [_draw("a", "red", "circle"), _draw("b", "red", "square"), _draw("c", "blue", "circle"), _draw("d", "red", "circle")]
    items = [torch.zeros(3, 48, 48)] * 3 + [None]  # the last one was not finished
    scores = tasks.generation_scores(samples, items, "image")
    assert scores["by_attribute"] == {"colour": 0.5, "shape": 0.5, "colour_and_shape": 0.25}
    assert scores["accuracy"] == 0.25 and scores["complete"] == 0.75 and scores["count"] == 4


def test_generation_task_end_to_end_draws_one_complete_image_per_prompt(tokenizer_dir, monkeypatch):
    from mmfuse.eval import probes
    from mmfuse.eval.adapter import EvalAdapter
    from mmfuse.eval.tasks import evaluate_task

    monkeypatch.setattr(probes, "load_probe", lambda modality: KnownProbe())
    monkeypatch.setattr(probes, "probe_metrics", lambda modality: {})
    config = token_config(tokenizer_dir)
    config.codecs["image"].settings = dict(WORLD_SIZE_CODEC)
    model = MultimodalLM.from_config(config).eval()
    samples = [_draw(f"s{i}", "red", "circle") for i in range(3)]
    items = EvalAdapter(model, batch_size=2).generate_media(samples, "image")
    assert [tuple(item.shape) for item in items] == [(3, 48, 48)] * 3  # an untrained model still completes its spans

    written = {"s": samples}
    monkeypatch.setattr("mmfuse.eval.tasks.load_samples", lambda path, **options: written["s"])
    monkeypatch.setattr("mmfuse.eval.tasks.resolve_dataset", lambda data, task, split: "unused")
    result = evaluate_task(EvalAdapter(model), "unused", "image_generation")
    assert result["complete"] == 1.0 and result["accuracy"] == 1.0  # the probe says red circle, as asked


def test_shared_code_start_is_the_highest_block_without_special_ids():
    assert shared_code_start(610, [0, 1, 2, 3, 4, 5, 6], 512) == 98
    assert shared_code_start(100, [0, 50, 99], 48) == 51  # below the top special, above the middle one
    assert shared_code_start(100, [0, 50, 99], 49) == 1  # only below the middle one
    with pytest.raises(ValueError, match="no block of 50 text ids"):
        shared_code_start(100, [0, 50, 99], 50)


def test_shared_vocabulary_reads_and_writes_image_codes_as_text_ids(tokenizer_dir, media_dir, tmp_path):
    model = MultimodalLM.from_config(token_config(tokenizer_dir, vocabulary="shared")).eval()
    start = shared_code_start(TEXT_ROWS, model.tokenizer.all_special_ids, IMAGE_CODES)
    vocab = model.fusion.vocabularies["image"]
    assert (vocab.begin, vocab.end, vocab.first_code, model.config.fusion.options["code_start"]) == (TEXT_ROWS, TEXT_ROWS + 1, start, start)
    assert model.llm.get_input_embeddings().num_embeddings == TEXT_ROWS + 2  # only begin and end are new rows
    assert list(model.fusion.added_vocabulary()) == [TEXT_ROWS, TEXT_ROWS + 1]
    batch = model.collator()([model.processor(draw_sample(media_dir))])
    inputs = model.llm_inputs(batch["input_ids"], batch["media"])
    begin = batch["input_ids"][0].tolist().index(TEXT_ROWS)
    codes = model.codecs["image"].encode(batch["media"]["image"])[0, :, 0]
    assert torch.equal(inputs["input_ids"][0, begin + 1: begin + 1 + IMAGE_CODES], codes + start)  # words' ids
    labels = model.fusion.labels(batch["labels"], inputs)
    assert torch.equal(labels[0, begin + 1: begin + 1 + IMAGE_CODES], codes + start)
    assert torch.isfinite(model(**batch).loss)
    # drawing: inside the span only the shared block, exactly its length, then the end token
    prompt = model.collator("left")([model.processor(look_sample(media_dir), for_generation=True)])
    outside_block = [i for i in range(TEXT_ROWS) if not start <= i < start + IMAGE_CODES]
    image = model.generate(prompt["input_ids"], prompt["attention_mask"], prompt["media"], outputs=("image",),
                           max_new_tokens=IMAGE_CODES + 3, do_sample=False, logits_processor=[Boost(outside_block)])[0].tolist()
    assert image[0] == vocab.begin and image[IMAGE_CODES + 1] == vocab.end
    assert all(start <= t < start + IMAGE_CODES for t in image[1: IMAGE_CODES + 1])
    _, items = model.decode_output(torch.tensor([image]))[0]
    assert items[0][1].shape == (3, 16, 16)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.fusion.vocabularies["image"] == vocab
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_a_codec_trained_on_text_embeddings_fixes_the_shared_block(tokenizer_dir, media_dir):
    config = token_config(tokenizer_dir, vocabulary="shared")
    config.codecs["image"].settings.update(quantizer="simvq", text_ids_start=40)  # a codebook of ids 40-55's embeddings
    model = MultimodalLM.from_config(config).train()
    assert model.fusion.vocabularies["image"].first_code == 40
    codec = model.codecs["image"]
    words = model.llm.get_input_embeddings().weight[40:56, :4].detach()
    codec.quantizer.frozen_codebook.copy_(words)
    assert "quantizer.frozen_codebook" not in dict(codec.named_parameters())  # a buffer: no optimizer moves it
    codec.train()
    batch = model.collator()([model.processor(draw_sample(media_dir))])
    implicit = codec.quantizer.codebook.detach().clone()
    optimizer = torch.optim.SGD(codec.parameters(), lr=0.1)
    quantized, _, loss = codec.quantize(batch["media"]["image"])
    (loss + codec.reconstruct(quantized).pow(2).mean()).backward()
    optimizer.step()
    assert torch.equal(codec.quantizer.frozen_codebook, words)
    assert not torch.equal(codec.quantizer.codebook, implicit)  # the codes move together, through the linear map
    config.fusion.options["code_start"] = 41
    with pytest.raises(ValueError, match="code_start 41 differs from 40"):
        MultimodalLM.from_config(config)
    with pytest.raises(ValueError, match="needs quantizer 'simvq'"):
        ImageCodec(quantizer="vq", text_ids_start=40)
    with pytest.raises(ValueError, match="with vocabulary 'shared' only"):
        TokenFusion(TEXT_ROWS, {"image": [16, 1]}, code_start=40)

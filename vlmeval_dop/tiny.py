"""Deterministic tiny random-weight checkpoints of the four supported MLLM families (tests, demo).

Each family is built from stock transformers configs and processors, saved to a local directory and loaded
back through the ordinary ``from_pretrained`` path, so tests exercise exactly the classes and token mechanics
of the real checkpoints; only sizes and weights differ. Nothing is downloaded: the tokenizers are built here
from a fixed vocabulary (BPE merges learned by a small deterministic trainer below).

====================  ==========================================  ====================================
family                real checkpoint it mirrors                  tiny_image() (224x224) gives
====================  ==========================================  ====================================
``llava15``           llava-hf/llava-1.5-7b-hf                    1 tile x (112/14)^2  = 64 ``<image>``
``llavanext``         llava-hf/llava-v1.6-vicuna-7b-hf            base + 2x2 crops: 64 + 16*16 + 16
                                                                  row newlines = 336 ``<image>``
``qwen25vl``          Qwen/Qwen2.5-VL-7B-Instruct                 (224/28)^2 = 64 ``<|image_pad|>``
``internvl3``         OpenGVLab/InternVL3-8B-hf                   4 tiles + thumbnail = 5 x 16 = 80
                                                                  ``<IMG_CONTEXT>``
====================  ==========================================  ====================================

The 224x224 default image is twice the 112 px base tile, the tiny analogue of the paper's 672x672 (LLaVA-NeXT)
and 896x896 (InternVL3) settings. Decoders: hidden 64, 4 layers, 4 heads of 16, MLP 128, float32; the
Qwen2-style decoders (Qwen2.5-VL, InternVL3) use GQA with 2 KV heads like the real ones.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pathlib
import shutil
import string
import tempfile
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

TINY_FAMILIES: tuple[str, ...] = ("llava15", "llavanext", "qwen25vl", "internvl3")
# Families beyond the paper's six models (issue 15), built and loaded the same way. A separate tuple: tests
# and tools parametrised over the paper families (TINY_FAMILIES) stay as they are; ALL_TINY_FAMILIES is both.
TINY_NEW_FAMILIES: tuple[str, ...] = ("qwen2vl", "internvl35", "llavaov", "smolvlm", "qwen3vl", "gemma3")
# Video-LLaVA (issue 14): images and videos; not in TINY_NEW_FAMILIES, whose battery runs image inputs only and
# checks GQA decoders (tests/test_executor_video_llava.py runs the battery on both input kinds).
TINY_VIDEO_FAMILIES: tuple[str, ...] = ("videollava",)
ALL_TINY_FAMILIES: tuple[str, ...] = TINY_FAMILIES + TINY_NEW_FAMILIES + TINY_VIDEO_FAMILIES

# Bump when anything that changes the saved files changes: caches are keyed by it (<family>-v<VERSION>).
TINY_VERSION = 1

# Default tiny_image() size: 2x the 112 px base tile (see the module docstring).
TINY_IMAGE_SIZE: tuple[int, int] = (224, 224)

# Placeholder tokens (model.config.image_token_id) one default tiny_image() yields; asserted in tests.
TINY_VISUAL_TOKENS: dict[str, int] = {"llava15": 64, "llavanext": 336, "qwen25vl": 64, "internvl3": 80,
                                       "qwen2vl": 64, "internvl35": 80, "llavaov": 336, "smolvlm": 80,
                                       "qwen3vl": 49, "gemma3": 64, "videollava": 64}
# Video-LLaVA: frames per video (the real processor's 8) and the placeholders one tiny_video() yields: HF's
# Video-LLaVA keeps each frame's [CLS] feature, 8 x (1 + (112/14)^2) = 520 <video> (real: 8 x 257 = 2056).
TINY_VIDEO_FRAMES = 8
TINY_VIDEO_TOKENS: dict[str, int] = {"videollava": 8 * 65}

_SEEDS = {"llava15": 1501, "llavanext": 1601, "qwen25vl": 2507, "internvl3": 3008, "qwen2vl": 2409,
          "internvl35": 3508, "llavaov": 2408, "smolvlm": 5005, "qwen3vl": 3008, "gemma3": 3404, "videollava": 1707}
_MARKER = "vlmeval_dop_tiny.json"  # written last: its presence means the directory is complete
_REQUIRED_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja",
)  # fmt: skip

# --- sizes --------------------------------------------------------------------------------------------
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=16)
_KV_HEADS_GQA = 2
# Vision width differs from the text width on purpose, so the projector really maps between two spaces.
_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
_VISION_LAYERS = 2
_TILE = 112  # base tile / crop size in pixels (real: 336 for LLaVA, 448 for InternVL)
_PATCH = 14  # ViT patch size of every real family
# Larger than HF's 0.02 so that the random decoder's logits depend visibly on the image and have clear
# argmax margins (token-level comparisons in the tests are then not decided by float noise).
_INIT_RANGE = 0.1

# LLaVA-NeXT anyres pinpoints: the real [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# scaled to the 112 px tile, so a 224x224 image selects the 2x2 grid (4 crops + base) like 672x672 does.
_PINPOINTS = [[_TILE * h, _TILE * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]

# Qwen2.5-VL: 28 px per LLM token (patch 14, 2x2 merge). max_pixels caps an image at 8x8 = 64 tokens (a
# 224x224 image is kept as is); min_pixels is the real 56*56.
_QWEN_MIN_PIXELS = 56 * 56
_QWEN_MAX_PIXELS = 224 * 224

# --- chat templates: those of the real processors (llava-hf, Qwen2.5-VL-Instruct, InternVL3-hf) ----------
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_QWEN25VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# --- tokenizer vocabulary -----------------------------------------------------------------------------
# Words of typical VQA prompts and chat scaffolding; each becomes a single token (with and without the
# word-start marker), everything else falls back to characters / bytes like a real BPE tokenizer.
_WORDS = (
    "a an the this that these those there here it its is are was were be been do does did can could "
    "would should will what which who whom whose where when why how many much of in on at to from by with "
    "for about into over under above below near between behind front and or not no yes one two three four "
    "five six seven eight nine ten image picture photo photograph scene shown show shows describe description "
    "detail details answer question questions option options choose correct letter word phrase single short "
    "briefly using please provide color colour shape size number count text written left right top bottom "
    "middle center background foreground red green blue yellow white black brown gray grey orange purple pink "
    "man woman men women person people child boy girl dog cat bird horse car bus truck train bike boat plane "
    "table chair bed room street road sky water tree grass building sign food ball object objects animal "
    "animals doing wearing holding sitting standing looking like see seen visible you your helpful "
    "assistant user system USER ASSISTANT"
).split()
# Sentence-initial forms: in every template the question starts right after a newline or a special token.
_WORDS += [
    w.capitalize()
    for w in "what which who where when why how is are do does can describe answer please you the this there".split()
]


def _learn_bpe(pieces: list[str], alphabet: list[str]) -> list[tuple[str, str]]:
    """Merges that turn every piece into one token, learned like BPE with deterministic tie-breaking.

    Replaying them in rank order (what the BPE model does) reproduces this segmentation, so every piece
    encodes to a single token. Ties go to the lexicographically smallest pair: no hash order is involved.
    """
    known = set(alphabet)
    missing = sorted({ch for p in pieces for ch in p} - known)
    assert not missing, f"characters outside the alphabet: {missing}"
    words = [list(p) for p in dict.fromkeys(pieces)]
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for w in words:
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        best = min(pairs, key=lambda ab: (-pairs[ab], ab))
        merges.append(best)
        merged = best[0] + best[1]
        for i, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out


def _vocab(alphabet: list[str], merges: list[tuple[str, str]], head: list[str], tail: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for tok in head + alphabet + [a + b for a, b in merges] + tail:
        vocab.setdefault(tok, len(vocab))
    return vocab


def _llama_tokenizer(added: tuple[str, ...] = ("<image>", "<pad>")):
    """LlamaTokenizer (SentencePiece-style BPE, byte fallback) with llava-hf's added tokens.

    Layout as in llava-hf: <unk>=0, <s>=1, </s>=2, <0x00>..<0xFF>, pieces, then ``<image>`` and ``<pad>``
    as the last two ids (32000 and 32001 in the real model). `added`: the tokens appended after the pieces
    (Video-LLaVA-hf: ``<image>``, ``<video>``, ``<pad>`` = 32000, 32001, 32002).
    """
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    alphabet = ["▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    merges = _learn_bpe(["▁" + w for w in _WORDS] + _WORDS, alphabet)
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    vocab = _vocab(alphabet, merges, head, list(added))
    tok = LlamaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, pad_token="<pad>", padding_side="left"
    )
    # Registering existing vocab entries as special keeps their ids and stops them from being split.
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> printable character map used by byte-level BPE (Qwen2 tokenizer)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# Qwen2.5 added tokens in their real order (151643..151664); the first 14 are special.
_QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
_QWEN_PLAIN = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"]  # fmt: skip
# InternVL3-hf appends these after the Qwen2.5 tokens (<img>=151665, </img>=151666, <IMG_CONTEXT>=151667).
_INTERNVL_SPECIAL = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
                     "<video>"]  # fmt: skip


# Qwen3 appends these plain tokens after Qwen2.5's (151665..151668); InternVL3.5-hf's <img> ... follow them.
_QWEN3_PLAIN = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
# LLaVA-OneVision (llava-hf, Qwen2-7B-Instruct tokenizer): the three Qwen2 special tokens, then <image>=151646
# and <video>=151647.
_LLAVA_OV_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]


def _qwen_tokenizer(internvl: bool, qwen3: bool = False, llava_ov: bool = False):
    """Qwen2Tokenizer (byte-level BPE) with the Qwen2.5 added tokens (+ InternVL3's, named as in -hf).

    `qwen3`: Qwen3's added tokens (InternVL3.5); `llava_ov`: LLaVA-OneVision's Qwen2 tokens instead.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    alphabet = [_bytes_to_unicode()[b] for b in range(256)]
    # "Ġ" is the byte-level space: " word" mid-sentence, bare "word" at a line start ("user\n", "What ...").
    merges = _learn_bpe(["Ġ" + w for w in _WORDS] + _WORDS, alphabet)
    if llava_ov:
        special, plain = list(_LLAVA_OV_SPECIAL), []
        vocab = _vocab(alphabet, merges, [], special)
    else:
        special = _QWEN_SPECIAL + (_INTERNVL_SPECIAL if internvl else [])
        plain = _QWEN_PLAIN + (_QWEN3_PLAIN if qwen3 else [])
        vocab = _vocab(alphabet, merges, [], _QWEN_SPECIAL + plain + (_INTERNVL_SPECIAL if internvl else []))
    kwargs: dict[str, Any] = {}
    if internvl:
        # InternVLProcessor reads these named tokens (tokenizer.start_image_token, ..._id) from the tokenizer.
        kwargs["extra_special_tokens"] = {
            "start_image_token": "<img>", "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>",
        }  # fmt: skip
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", padding_side="left", **kwargs,
    )  # fmt: skip
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return tok


# --- builders -----------------------------------------------------------------------------------------
def _clip_vision(**extra) -> dict:
    """CLIP ViT vision tower config (CLIP-L/14 layout, tiny)."""
    return dict(
        model_type="clip_vision_model", image_size=_TILE, patch_size=_PATCH, num_hidden_layers=_VISION_LAYERS,
        projection_dim=_TEXT["hidden_size"], hidden_act="quick_gelu", layer_norm_eps=1e-5,
        initializer_range=0.02, **_VISION, **extra,
    )  # fmt: skip


def _llama_text(tok) -> dict:
    """Vicuna-7B layout (LLaMA, full multi-head attention), tiny."""
    return dict(
        model_type="llama", vocab_size=len(tok), num_key_value_heads=_TEXT["num_attention_heads"],
        max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", initializer_range=_INIT_RANGE,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, **_TEXT,
    )  # fmt: skip


def _build_llava(next_: bool):
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tok = _llama_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    common = dict(
        vision_config=_clip_vision(), text_config=_llama_text(tok), image_token_id=image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(_TILE // _PATCH) ** 2, tie_word_embeddings=False,
    )  # fmt: skip
    # num_additional_image_tokens=1 (the CLS token) and strategy "default" (which drops it) cancel out:
    # (112/14)^2 placeholders per tile, exactly as the real processors count 576 for 336 px.
    proc_kwargs = dict(patch_size=_PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    image_kwargs = dict(size={"shortest_edge": _TILE}, crop_size={"height": _TILE, "width": _TILE})
    if next_:
        config = LlavaNextConfig(image_grid_pinpoints=_PINPOINTS, **common)
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessor(image_grid_pinpoints=_PINPOINTS, **image_kwargs)
        processor = LlavaNextProcessor(image_processor, tok, chat_template=_LLAVA_TEMPLATE, **proc_kwargs)
    else:
        config = LlavaConfig(**common)
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessor(**image_kwargs)
        processor = LlavaProcessor(image_processor, tok, chat_template=_LLAVA_TEMPLATE, **proc_kwargs)
    gen = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model, processor, gen


# llava-hf's template with videos rendered like images (`<video>\n` before the text): the prompt Video-LLaVA's
# own examples and VLMEvalKit's VideoLLaVA_HF use, `USER: <video>\n<question> ASSISTANT:`.
_VIDEOLLAVA_TEMPLATE = _LLAVA_TEMPLATE.replace(
    "{# Render all text next #}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}",
)


def _build_videollava():
    """LanguageBind/Video-LLaVA-7B-hf layout (`VideoLlavaForConditionalGeneration`): two CLIP-L/14-shaped towers
    (image and video; each frame of a video goes through the video tower on its own), one shared projector, a
    Vicuna (LLaMA) decoder. Images: (112/14)^2 = 64 `<image>` ([CLS] dropped, strategy "default"); videos: 8
    frames x (1 + 64) `<video>` (HF keeps every frame's [CLS] feature). Real: 224 px, 256 / 8 x 257."""
    from transformers import (
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
        VideoLlavaImageProcessor,
        VideoLlavaProcessor,
        VideoLlavaVideoProcessor,
    )

    tok = _llama_tokenizer(added=("<image>", "<video>", "<pad>"))
    per_frame = (_TILE // _PATCH) ** 2
    config = VideoLlavaConfig(
        vision_config=_clip_vision(), text_config=_llama_text(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=per_frame,
        video_seq_length=TINY_VIDEO_FRAMES * (per_frame + 1), pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    model = VideoLlavaForConditionalGeneration(config)
    sizes = dict(size={"shortest_edge": _TILE}, crop_size={"height": _TILE, "width": _TILE})
    processor = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(**sizes), video_processor=VideoLlavaVideoProcessor(**sizes),
        tokenizer=tok, patch_size=_PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=_VIDEOLLAVA_TEMPLATE,
    )  # fmt: skip
    gen = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model, processor, gen


def _qwen_mrope_text(tok, ids: dict, **overrides) -> dict:
    """Text config of the Qwen M-RoPE families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): GQA, the real mrope_section
    [16, 24, 24] of head_dim 128 scaled to head_dim 16 unless overridden."""
    text_config = dict(
        vocab_size=len(tok), num_key_value_heads=_KV_HEADS_GQA, max_position_embeddings=128000, rms_norm_eps=1e-6,
        hidden_act="silu", initializer_range=_INIT_RANGE, use_sliding_window=False,
        # M-RoPE: (temporal, height, width) sections of the head_dim/2 rotary frequencies
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False, **_TEXT,
    )  # fmt: skip
    text_config.update(overrides)
    assert sum(text_config["rope_parameters"]["mrope_section"]) == _TEXT["head_dim"] // 2
    return text_config


def _qwen_mrope_rest(config_cls, model_cls, processor_cls, video_cls, tok, ids, text_config, vision_config,
                     patch: int, size: dict, template: str, **norm):  # fmt: skip
    """Model (built here: after the configs, so the weights' RNG draws follow the model alone), processor and
    generation settings of a Qwen M-RoPE family."""
    from transformers import Qwen2VLImageProcessor

    config = config_cls(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )  # fmt: skip
    model = model_cls(config)
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=patch, temporal_patch_size=2, merge_size=2, **norm)
    video_processor = video_cls(size=size, patch_size=patch, temporal_patch_size=2, merge_size=2, **norm)
    processor = processor_cls(image_processor, tok, video_processor, chat_template=template)
    gen = dict(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    return model, processor, gen


def _build_qwen25vl():
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = _qwen_tokenizer(internvl=False)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIAL}
    text_config = _qwen_mrope_text(tok, ids)
    vision_config = dict(
        depth=_VISION_LAYERS, hidden_size=_VISION["hidden_size"], intermediate_size=_VISION["intermediate_size"],
        num_heads=_VISION["num_attention_heads"], hidden_act="silu", out_hidden_size=_TEXT["hidden_size"],
        patch_size=_PATCH, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
        # window_size 112 px = 4x4 merged tokens: the 8x8 grid of tiny_image() splits into 4 windows, and the
        # last block attends fully (real: windowed blocks with full attention in 7, 15, 23, 31).
        window_size=112, fullatt_block_indexes=[_VISION_LAYERS - 1], initializer_range=0.02,
    )  # fmt: skip
    size = {"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS}
    return _qwen_mrope_rest(
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, tok, ids,
        text_config, vision_config, _PATCH, size, _QWEN25VL_TEMPLATE,
    )  # fmt: skip


def _qwen2_text(tok) -> tuple[int, int, dict]:
    """(<|im_end|> id, <|endoftext|> id, text config) of a Qwen2 decoder with GQA (InternVL3, LLaVA-OneVision)."""
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    text_config = dict(
        model_type="qwen2", vocab_size=len(tok), num_key_value_heads=_KV_HEADS_GQA, max_position_embeddings=32768,
        rms_norm_eps=1e-6, hidden_act="silu", initializer_range=_INIT_RANGE, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot, tie_word_embeddings=False, **_TEXT,
    )  # fmt: skip
    return im_end, eot, text_config


def _build_internvl3(qwen3: bool = False):
    """InternVL3-8B-hf layout (Qwen2.5 decoder); `qwen3`: InternVL3.5-8B-HF's (Qwen3 decoder with per-head q/k
    RMSNorm, no attention biases, Qwen3's added tokens before InternVL's)."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tok = _qwen_tokenizer(internvl=True, qwen3=qwen3)
    im_end, eot, text_config = _qwen2_text(tok)
    downsample = 0.5
    image_seq_length = int((_TILE // _PATCH) ** 2 * downsample**2)  # 16 per tile (real: 256 per 448 px tile)
    if qwen3:  # Qwen3-8B's config: no biases, 40960 positions (q/k norms come with the model type)
        text_config.update(model_type="qwen3", attention_bias=False, max_position_embeddings=40960)
    vision_config = dict(
        image_size=[_TILE, _TILE], patch_size=[_PATCH, _PATCH], num_hidden_layers=_VISION_LAYERS,
        hidden_act="gelu", norm_type="layer_norm", layer_norm_eps=1e-6, attention_bias=True, use_qk_norm=False,
        layer_scale_init_value=0.1, use_mean_pooling=True, initializer_range=0.02, **_VISION,
    )  # fmt: skip
    config = InternVLConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=tok.context_image_token_id,
        image_seq_length=image_seq_length, downsample_ratio=downsample, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )  # fmt: skip
    model = InternVLForConditionalGeneration(config)
    imagenet = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    tile = {"height": _TILE, "width": _TILE}
    # crop_to_patches with 1..12 tiles as the real processor: a 224x224 image becomes 2x2 tiles + thumbnail.
    image_processor = GotOcr2ImageProcessor(size=tile, crop_to_patches=True, min_patches=1, max_patches=12, **imagenet)
    video_processor = InternVLVideoProcessor(size=tile, **imagenet)
    processor = InternVLProcessor(
        image_processor, tok, video_processor, image_seq_length=image_seq_length, chat_template=_INTERNVL_TEMPLATE
    )
    return model, processor, dict(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)


def _build_qwen2vl():
    """Qwen2-VL-7B-Instruct layout: Qwen2 decoder with M-RoPE (as Qwen2.5-VL), Qwen2-VL's vision tower (no
    window attention, LayerNorm blocks, quick_gelu MLP) and processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = _qwen_tokenizer(internvl=False)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIAL}
    text_config = _qwen_mrope_text(tok, ids, max_position_embeddings=32768)
    vision_config = dict(
        depth=_VISION_LAYERS, embed_dim=_VISION["hidden_size"], hidden_size=_TEXT["hidden_size"],
        num_heads=_VISION["num_attention_heads"], mlp_ratio=_VISION["intermediate_size"] // _VISION["hidden_size"],
        hidden_act="quick_gelu", patch_size=_PATCH, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.02,
    )  # fmt: skip
    size = {"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS}
    # Qwen2-VL-Instruct's chat template renders one image turn exactly as Qwen2.5-VL-Instruct's
    return _qwen_mrope_rest(
        Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor, tok, ids,
        text_config, vision_config, _PATCH, size, _QWEN25VL_TEMPLATE,
    )  # fmt: skip


# LLaVA-OneVision anyres pinpoints: the real 384 x {1..6} x 384 x {1..6} grid scaled to the 112 px tile; a
# 224x224 image selects the 2x2 grid (base + 4 crops), as 768x768 does on the real model.
_OV_PINPOINTS = [[_TILE * h, _TILE * w] for h in range(1, 7) for w in range(1, 7)]
_LLAVA_OV_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _build_llavaov():
    """llava-hf/llava-onevision-qwen2-7b-ov-hf layout: SigLIP tower (last layer, all patches: strategy
    "full"), Qwen2 decoder (GQA, q/k/v biases), anyres_max_9 tiling with one newline token per feature row."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tok = _qwen_tokenizer(internvl=False, llava_ov=True)
    im_end, eot, text_config = _qwen2_text(tok)
    vision_config = dict(
        model_type="siglip_vision_model", image_size=_TILE, patch_size=_PATCH, num_hidden_layers=_VISION_LAYERS,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, **_VISION,
    )  # fmt: skip
    per_tile = (_TILE // _PATCH) ** 2  # 64 (real: (384/14)^2 = 729)
    config = LlavaOnevisionConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"), projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=_OV_PINPOINTS,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = LlavaOnevisionForConditionalGeneration(config)
    half = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])  # SigLIP normalisation, as the real one
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": _TILE, "width": _TILE}, image_grid_pinpoints=_OV_PINPOINTS, **half
    )
    video_processor = LlavaOnevisionVideoProcessor(size={"height": _TILE, "width": _TILE}, **half)
    processor = LlavaOnevisionProcessor(
        image_processor, tok, video_processor, num_image_tokens=per_tile, vision_feature_select_strategy="full",
        chat_template=_LLAVA_OV_TEMPLATE, vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    return model, processor, dict(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)


# SmolVLM (Idefics3 layout, HuggingFaceTB/SmolVLM-500M-Instruct): SmolLM2's tokens 0-2, then the image markers.
_SMOLVLM_HEAD = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_SMOLVLM_TAIL = (["<fake_token_around_image>", "<image>", "<global-img>"]
                 + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)] + ["<end_of_utterance>"])  # fmt: skip
_SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _smolvlm_tokenizer():
    """GPT-2 style byte-level BPE as SmolLM2's, with SmolVLM's image markers as added special tokens."""
    from tokenizers import AddedToken
    from transformers import GPT2Tokenizer

    alphabet = [_bytes_to_unicode()[b] for b in range(256)]
    merges = _learn_bpe(["Ġ" + w for w in _WORDS] + _WORDS, alphabet)
    vocab = _vocab(alphabet, merges, list(_SMOLVLM_HEAD), list(_SMOLVLM_TAIL))
    tok = GPT2Tokenizer(
        vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|im_start|>",
        eos_token="<end_of_utterance>", pad_token="<|im_end|>", padding_side="left",
    )  # fmt: skip
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in _SMOLVLM_HEAD + _SMOLVLM_TAIL],
                   special_tokens=True)  # fmt: skip
    return tok


def _build_smolvlm():
    """HuggingFaceTB/SmolVLM-500M-Instruct layout (`Idefics3ForConditionalGeneration`): SigLIP tower, pixel
    shuffle (scale 2 here, 4 real), LLaMA decoder (SmolLM2, GQA), each image resized to a longest edge of 2 tiles
    (4 x 512 px real) and split into tiles + a global view, with <fake_token_around_image> / <row_i_col_j> /
    <global-img> text markers between the tiles' <image> runs."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tok = _smolvlm_tokenizer()
    scale = 2
    per_tile = (_TILE // _PATCH) ** 2 // scale**2  # 16 (real: (512/16)^2 / 16 = 64)
    text_config = dict(
        model_type="llama", vocab_size=len(tok), num_key_value_heads=_KV_HEADS_GQA, max_position_embeddings=8192,
        rms_norm_eps=1e-5, hidden_act="silu", initializer_range=_INIT_RANGE, rope_parameters={"rope_type": "default",
        "rope_theta": 100000.0}, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **_TEXT,
    )  # fmt: skip
    vision_config = dict(
        image_size=_TILE, patch_size=_PATCH, num_hidden_layers=_VISION_LAYERS, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, initializer_range=0.02, **_VISION,
    )  # fmt: skip
    config = Idefics3Config(
        vision_config=vision_config, text_config=text_config, image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=scale, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 2 * _TILE}, max_image_size={"longest_edge": _TILE}, do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )  # fmt: skip
    processor = Idefics3Processor(image_processor, tok, image_seq_len=per_tile, chat_template=_SMOLVLM_TEMPLATE)
    gen = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model, processor, gen


_QWEN3VL_TEMPLATE = (  # Qwen3-VL-Instruct's format for image/text turns: no default system message
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_qwen3vl():
    """Qwen/Qwen3-VL-8B-Instruct layout: Qwen3 decoder (q/k RMSNorm) with interleaved M-RoPE, a 16 px patch
    tower (32 px per LLM token) whose intermediate layers feed DeepStack: their merged features are added to the
    visual tokens' hidden states after the first decoder layers (here after layers 0 and 1; real: 0, 1, 2)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tok = _qwen_tokenizer(internvl=False, qwen3=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIAL}
    text_config = _qwen_mrope_text(
        tok, ids, max_position_embeddings=262144, attention_bias=False,
        # interleaved M-RoPE: the real mrope_section [24, 20, 20] of head_dim 128 scaled to head_dim 16
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True},
    )  # fmt: skip
    del text_config["use_sliding_window"]  # not a Qwen3-VL text config field
    patch = 16
    vision_config = dict(
        depth=_VISION_LAYERS, hidden_size=_VISION["hidden_size"], intermediate_size=_VISION["intermediate_size"],
        num_heads=_VISION["num_attention_heads"], hidden_act="gelu_pytorch_tanh", out_hidden_size=_TEXT["hidden_size"],
        patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1], initializer_range=0.02,
    )  # fmt: skip
    unit = 2 * patch  # 32 px per LLM token
    size = {"shortest_edge": 2 * unit * 2 * unit, "longest_edge": 7 * unit * 7 * unit}  # a 224x224 image: 7x7
    return _qwen_mrope_rest(
        Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor, tok, ids,
        text_config, vision_config, patch, size, _QWEN3VL_TEMPLATE, image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )  # fmt: skip


# Gemma 3 (google/gemma-3-4b-it): Gemma's special tokens in their real order (<pad>=0, <eos>=1, <bos>=2, <unk>=3,
# <mask>=4, <start_of_turn>/<end_of_turn> at 105/106 real), the image markers late (<start_of_image>=255999,
# <end_of_image>=256000 real) and <image_soft_token> last (262144 real).
_GEMMA3_HEAD = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
_GEMMA3_TAIL = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
_GEMMA3_TEMPLATE = (  # google/gemma-3-4b-it's chat template (system text prefixed to the first user turn)
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- else -%}{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}"
    "{%- endif -%}"
)
# Sliding window of the tiny Gemma 3: far shorter than a prompt (~100 tokens with the 64 image tokens), so the
# window cuts text and image tokens alike (real: 1024 of a 32k context, the image 256 tokens).
GEMMA3_TINY_WINDOW = 12


def _gemma3_tokenizer():
    """GemmaTokenizer (SentencePiece-style BPE with byte fallback) with Gemma 3's image markers as special tokens."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    alphabet = ["▁", "\n"] + list(string.ascii_letters + string.digits + string.punctuation)
    words = _WORDS + ["model"]  # the chat template's role name (`<start_of_turn>model`)
    merges = _learn_bpe(["▁" + w for w in words] + words, alphabet)
    head = list(_GEMMA3_HEAD) + [f"<0x{i:02X}>" for i in range(256)]
    vocab = _vocab(alphabet, merges, head, list(_GEMMA3_TAIL))
    tok = GemmaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, padding_side="left",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )  # fmt: skip
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in _GEMMA3_HEAD + _GEMMA3_TAIL],
                   special_tokens=True)  # fmt: skip
    return tok


def _build_gemma3():
    """google/gemma-3-4b-it layout (`Gemma3ForConditionalGeneration`): SigLIP tower (no head), 2x2 (real: 4x4)
    average pooling of its patches to `mm_tokens_per_image` tokens (real: 64x64 patches -> 16x16 = 256; here
    16x16 -> 8x8 = 64), an RMS-normed projection, and a Gemma 3 decoder: GQA with q/k RMSNorm, (1 + w) RMSNorms
    before and after attention and MLP, embeddings scaled by sqrt(hidden), `query_pre_attn_scalar` (24 here, not
    the head_dim, so the scaling matters), sliding-window layers (window `GEMMA3_TINY_WINDOW`, RoPE base 1e4)
    interleaved with a global layer (RoPE base 1e6, linear scaling x8 as the real 4B), image tokens attending to
    each other bidirectionally (`token_type_ids`). Every image is resized to 224x224 (pan-and-scan off, as
    VLMEvalKit's default). The RMSNorm weights and the projection are random (stock init sets them to 0)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tok = _gemma3_tokenizer()
    size = 2 * _TILE  # 224 px, 16x16 patches
    per_image = ((size // _PATCH) // 2) ** 2  # 64
    text_config = dict(
        model_type="gemma3_text", vocab_size=len(tok), num_key_value_heads=_KV_HEADS_GQA, max_position_embeddings=8192,
        rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", initializer_range=_INIT_RANGE,
        query_pre_attn_scalar=24, sliding_window=GEMMA3_TINY_WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
        pad_token_id=tok.pad_token_id, attn_logit_softcapping=None, final_logit_softcapping=None, **_TEXT,
    )  # fmt: skip
    vision_config = dict(
        model_type="siglip_vision_model", image_size=size, patch_size=_PATCH, num_hidden_layers=_VISION_LAYERS,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False, **_VISION,
    )  # fmt: skip
    config = Gemma3Config(
        vision_config=vision_config, text_config=text_config, mm_tokens_per_image=per_image,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"), tie_word_embeddings=True,
    )  # fmt: skip
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # stock init zeroes these: random values make the (1 + w) norms and the image matter
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1 and "language_model" in name:
                p.normal_(0.0, 0.3)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.3)
    image_processor = Gemma3ImageProcessor(
        size={"height": size, "width": size}, do_pan_and_scan=False, image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5], resample=2,
    )  # fmt: skip
    processor = Gemma3Processor(image_processor, tok, chat_template=_GEMMA3_TEMPLATE, image_seq_length=per_image)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    return model, processor, dict(bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, eot],
                                  pad_token_id=tok.pad_token_id)  # fmt: skip


def _check_family(family: str) -> None:
    if family not in ALL_TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; valid families: {', '.join(ALL_TINY_FAMILIES)}")


def _build(family: str):
    """(model, processor) of `family` with freshly initialised deterministic weights (not saved)."""
    from transformers import GenerationConfig

    _check_family(family)
    # The weights are a function of the family alone; fork_rng leaves the caller's RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEEDS[family])
        if family == "llava15":
            model, processor, gen = _build_llava(next_=False)
        elif family == "llavanext":
            model, processor, gen = _build_llava(next_=True)
        elif family == "qwen25vl":
            model, processor, gen = _build_qwen25vl()
        elif family == "internvl3":
            model, processor, gen = _build_internvl3()
        elif family == "internvl35":
            model, processor, gen = _build_internvl3(qwen3=True)
        elif family == "qwen2vl":
            model, processor, gen = _build_qwen2vl()
        elif family == "smolvlm":
            model, processor, gen = _build_smolvlm()
        elif family == "qwen3vl":
            model, processor, gen = _build_qwen3vl()
        elif family == "gemma3":
            model, processor, gen = _build_gemma3()
        elif family == "videollava":
            model, processor, gen = _build_videollava()
        else:
            model, processor, gen = _build_llavaov()
    model.generation_config = GenerationConfig(**gen)
    return model.eval(), processor


@contextlib.contextmanager
def _no_progress_bars():
    """Silence transformers' per-call save/load progress bars (noise in the demo), restoring the setting."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# --- cache --------------------------------------------------------------------------------------------
def _default_root() -> pathlib.Path:
    return pathlib.Path.home() / ".cache" / "vlmeval_dop" / "tiny"


@functools.lru_cache(maxsize=1)
def _fingerprint() -> str:
    """Hash of this module's source and the transformers release that serialises the files.

    Stored in the marker: a cache written by an edited builder (same TINY_VERSION, forgotten bump) or by
    another transformers release is rebuilt instead of silently reused.
    """
    import transformers

    h = hashlib.sha256(f"{TINY_VERSION}|{transformers.__version__}|".encode())
    try:
        h.update(pathlib.Path(__file__).read_bytes())
    except OSError:  # not importable from plain files (zipapp): TINY_VERSION alone keys the cache
        pass
    return h.hexdigest()[:16]


def _is_complete(path: pathlib.Path, family: str) -> bool:
    try:
        meta = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if meta.get("family") != family or meta.get("version") != TINY_VERSION or meta.get("fingerprint") != _fingerprint():
        return False
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def _save(family: str, path: pathlib.Path) -> None:
    import transformers

    model, processor = _build(family)
    with _no_progress_bars():
        model.save_pretrained(path)
        processor.save_pretrained(path)
    meta = {
        "family": family, "version": TINY_VERSION, "fingerprint": _fingerprint(), "seed": _SEEDS[family],
        "transformers": transformers.__version__,
    }  # fmt: skip
    (path / _MARKER).write_text(json.dumps(meta, indent=1) + "\n")


def tiny_path(family: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Directory of the saved tiny checkpoint of `family`, building it first if it is missing.

    The checkpoint lives in ``<cache_dir>/<family>-v<TINY_VERSION>``; `cache_dir` defaults to
    ``~/.cache/vlmeval_dop/tiny``. A complete directory written by this exact builder is reused; anything
    else there (incomplete, or from an edited builder / another transformers release) is rebuilt. A build goes
    to a temporary sibling directory that is renamed into place at the end, so an interrupted build never
    leaves a half directory and concurrent builders agree on one result (the weights are deterministic).

    Raises:
        ValueError: `family` is not one of TINY_FAMILIES.
    """
    _check_family(family)
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else _default_root()
    path = root / f"{family}-v{TINY_VERSION}"
    if _is_complete(path, family):
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=root))
    try:
        _save(family, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is a normal readable directory
        for _ in range(2):
            try:
                os.rename(tmp, path)  # atomic on POSIX; fails if `path` exists and is not empty
                return path
            except OSError:
                if _is_complete(path, family):  # another process finished first
                    return path
                if path.exists():  # incomplete or stale: move it aside, then retry once
                    trash = root / f".{path.name}.stale-{uuid.uuid4().hex}"
                    os.rename(path, trash)
                    shutil.rmtree(trash, ignore_errors=True)
        raise OSError(f"could not move the tiny {family} checkpoint into {path}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_MODEL_CLASSES = {
    "llava15": "LlavaForConditionalGeneration",
    "llavanext": "LlavaNextForConditionalGeneration",
    "qwen25vl": "Qwen2_5_VLForConditionalGeneration",
    "internvl3": "InternVLForConditionalGeneration",
    "qwen2vl": "Qwen2VLForConditionalGeneration",
    "internvl35": "InternVLForConditionalGeneration",
    "llavaov": "LlavaOnevisionForConditionalGeneration",
    "smolvlm": "Idefics3ForConditionalGeneration",
    "qwen3vl": "Qwen3VLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "videollava": "VideoLlavaForConditionalGeneration",
}


def load_tiny(
    family: str,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load the tiny `family` checkpoint (built on first use) as ``(model, processor)``, offline.

    Both go through the ordinary ``from_pretrained(path, local_files_only=True)`` of the family's stock
    model class and of ``AutoProcessor``; the model is in eval mode.

    Args:
        family: one of TINY_FAMILIES.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (any value transformers accepts).
        dtype: parameter dtype (the checkpoint is saved in float32).
        cache_dir: checkpoint root, see `tiny_path`.

    Raises:
        ValueError: `family` is not one of TINY_FAMILIES.
    """
    path = tiny_path(family, cache_dir)  # validates `family` first
    import transformers
    from transformers import AutoProcessor

    model_cls = getattr(transformers, _MODEL_CLASSES[family])
    with _no_progress_bars():
        model = model_cls.from_pretrained(
            path, local_files_only=True, attn_implementation=attn_implementation, dtype=dtype
        )
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.eval(), processor


def tiny_image(seed: int = 0, size: tuple[int, int] | None = None) -> Image.Image:
    """A deterministic RGB test image: smooth colour blobs (an 8x8 random grid, bicubic-upscaled).

    Args:
        seed: selects the image; equal seeds give identical pixels.
        size: ``(width, height)`` in pixels, PIL order; default TINY_IMAGE_SIZE (224x224).
    """
    width, height = size if size is not None else TINY_IMAGE_SIZE
    grid = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid, mode="RGB").resize((width, height), Image.Resampling.BICUBIC)


def tiny_video(seed: int = 0, frames: int = TINY_VIDEO_FRAMES, size: tuple[int, int] | None = None) -> np.ndarray:
    """A deterministic RGB test video, (frames, height, width, 3) uint8 (the layout video processors take).

    The frames morph from one `tiny_image` to another (a linear blend), so consecutive frames are similar but
    not equal, as in a real clip.
    """
    a = np.asarray(tiny_image(seed=2 * seed + 10_000, size=size), dtype=np.float64)
    b = np.asarray(tiny_image(seed=2 * seed + 10_001, size=size), dtype=np.float64)
    w = np.linspace(0.0, 1.0, frames)[:, None, None, None]
    return np.round((1.0 - w) * a + w * b).astype(np.uint8)


def tiny_inputs(
    family: str, processor: ProcessorMixin, questions: list[str], images: list[Image.Image] | None = None,
    *, videos: list[np.ndarray] | None = None,
) -> BatchFeature:  # fmt: skip
    """Batched model inputs: one image (or video) per question, chat-formatted with the generation prompt.

    Each prompt is ``processor.apply_chat_template`` of one user turn ``[image, question]`` (the real
    model's template); the batch is left padded and returned as PyTorch tensors (a ``BatchFeature``).

    Args:
        family: one of ALL_TINY_FAMILIES (the processor must be that family's).
        processor: the processor returned by `load_tiny`.
        questions: one question per sample, batch size >= 1.
        images: one image per question; default ``tiny_image(seed=i)`` for question i.
        videos: one video per question instead of images (`tiny_video` layout; families of TINY_VIDEO_FAMILIES).

    Raises:
        ValueError: unknown family, no questions, or a different number of images/videos and questions.
    """
    _check_family(family)
    questions = list(questions)
    if not questions:
        raise ValueError("tiny_inputs needs at least one question")
    if videos is not None:
        if family not in TINY_VIDEO_FAMILIES:
            raise ValueError(f"videos are for the families {', '.join(TINY_VIDEO_FAMILIES)}, not {family!r}")
        if images is not None or len(videos) != len(questions):
            raise ValueError(f"one video per question and no images: got {len(videos)} videos for {len(questions)} questions")
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True, tokenize=False,
            )  # fmt: skip
            for q in questions
        ]
        return processor(videos=list(videos), text=prompts, padding=True, padding_side="left", return_tensors="pt")
    images = [tiny_image(seed=i) for i in range(len(questions))] if images is None else list(images)
    if len(images) != len(questions):
        raise ValueError(f"one image per question: got {len(images)} images for {len(questions)} questions")
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in questions
    ]
    extra = {}
    if family == "gemma3":  # Gemma3Processor takes the images nested per sample; the template writes <bos>
        images, extra = [[image] for image in images], {"add_special_tokens": False}
    if family in TINY_VIDEO_FAMILIES:  # Video-LLaVA's processor names images `pixel_values_images` unless told
        extra["return_legacy_image_output"] = False
    return processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt", **extra)


__all__ = ["ALL_TINY_FAMILIES", "TINY_FAMILIES", "TINY_NEW_FAMILIES", "TINY_VERSION", "TINY_VIDEO_FAMILIES",
           "TINY_VIDEO_FRAMES", "TINY_VIDEO_TOKENS", "TINY_VISUAL_TOKENS", "load_tiny", "tiny_image", "tiny_inputs",
           "tiny_path", "tiny_video"]

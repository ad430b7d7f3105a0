"""The CLIP text tower (and CLIP's visual projection) that CDPruner needs for LLaVA-1.5 / LLaVA-NeXT.

CDPruner scores each visual token's relevance to the instruction in CLIP's joint image-text space: the
image side is the vision tower's feature layer, passed through the tower's own `post_layernorm` and
CLIP's `visual_projection`; the text side is `CLIPTextModelWithProjection` on the instruction. llava-hf
checkpoints ship the vision tower without `visual_projection` and without any text tower, so (as the
official code, `CLIPVisionTower.load_text_tower` in Theia-4869/CDPruner) we load both from the CLIP
checkpoint LLaVA's tower was initialised from, by default ``openai/clip-vit-large-patch14-336``.

Loading is lazy (first use) and cached per source. Nothing is downloaded when the hub is unreachable: a
missing checkpoint raises a ReducerError that says how to get it.

Long instructions: CLIP's text tower takes at most `max_position_embeddings` (77) tokens. The official code
tokenizes without truncation, right-pads the ids (and mask) with zeros to a multiple of 77, cuts them into
77-token segments and encodes each segment: M segments give M text embeddings (relevance averages over
them). We do the same (`ClipText.encode_text`).

Tiny CLIP for tests: `tiny_clip_path()` builds (once, deterministic seed, saved and loaded back through
`from_pretrained` like `vlmeval_dop.tiny`) a random CLIPModel whose vision width and projection size match
the tiny LLaVA vision towers (hidden 32, projection 64) and a character-level CLIP tokenizer. It lives here
and not in `vlmeval_dop/tiny.py` because the tiny checkpoints' cache fingerprint hashes that file's source:
adding to it would rebuild every tiny family. `default_clip_source(model)` picks the tiny CLIP for models
loaded from a tiny checkpoint directory and the real CLIP otherwise.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import threading
from dataclasses import dataclass

import torch
from torch import nn

from .base import ReducerError

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"  # LLaVA-1.5 / LLaVA-NeXT vision tower (official default)

TINY_CLIP_VERSION = 1
_TINY_CLIP_SEED = 7701
_TINY_MARKER = "vlmeval_dop_tiny.json"  # marker file of vlmeval_dop.tiny checkpoints and of the tiny CLIP


@dataclass
class ClipText:
    """CLIP's text tower with projection, its tokenizer, and CLIP's visual projection."""

    tokenizer: object
    text_model: nn.Module
    text_projection: nn.Module
    visual_projection: nn.Module
    max_positions: int

    def to(self, device: torch.device | str) -> "ClipText":
        """Move the towers to `device` in place (the device of the MLLM's vision tower: the official code
        runs CLIP's text tower and projection next to it); returns self."""
        for module in (self.text_model, self.text_projection, self.visual_projection):
            module.to(device)
        return self

    @torch.no_grad()
    def encode_text(self, text: str) -> torch.Tensor:
        """(M, C) projected text embeddings of `text`, one per 77-token segment (official segmentation).

        Ids and mask are right-padded with zeros to a multiple of `max_positions` and reshaped to
        (M, max_positions), as the official `CLIPVisionTower.forward` does.
        """
        enc = self.tokenizer(text=[text], return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        T = self.max_positions
        segments = (ids.shape[1] - 1) // T + 1
        pad = segments * T - ids.shape[1]
        ids = torch.cat([ids, ids.new_zeros(1, pad)], dim=1).reshape(-1, T)
        mask = torch.cat([mask, mask.new_zeros(1, pad)], dim=1).reshape(-1, T)
        device = next(self.text_model.parameters()).device
        out = self.text_model(input_ids=ids.to(device), attention_mask=mask.to(device))
        return self.text_projection(out.pooler_output).float()

    @torch.no_grad()
    def project_image(self, normed: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (..., C) of post-layernormed vision features (..., D), in float32."""
        w = self.visual_projection.weight
        return self.visual_projection(normed.to(device=w.device, dtype=w.dtype)).float()


_LOADED: dict[str, ClipText] = {}
_LOCK = threading.Lock()


def load_clip_text(source: str | os.PathLike = DEFAULT_CLIP) -> ClipText:
    """The CLIP text tower + visual projection of `source` (HF id or local directory), loaded once.

    Only the text tower, the two projections and the tokenizer are kept (the CLIP vision tower of the
    checkpoint is dropped after loading: LLaVA's own tower gives the features).

    Raises:
        ReducerError: the checkpoint cannot be loaded (e.g. offline and not in the local HF cache).
    """
    key = str(source)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        from transformers import AutoTokenizer, CLIPModel

        from ..tiny import _no_progress_bars

        try:
            with _no_progress_bars():
                clip = CLIPModel.from_pretrained(key, dtype=torch.float32)
                tokenizer = AutoTokenizer.from_pretrained(key)
        except (OSError, ValueError) as exc:
            raise ReducerError(
                f"CDPruner needs the CLIP text tower {key!r} (not part of llava-hf checkpoints) and could not "
                f"load it: {exc}. Download it once with `huggingface-cli download {key}` (or pass "
                "CDPruner(clip_model=<local directory>))"
            ) from exc
        clip.eval().requires_grad_(False)
        enc = ClipText(
            tokenizer=tokenizer,
            text_model=clip.text_model,
            text_projection=clip.text_projection,
            visual_projection=clip.visual_projection,
            max_positions=int(clip.config.text_config.max_position_embeddings),
        )
        _LOADED[key] = enc
        return enc


def random_clip_text(vision_width: int = 1024, shrink: int = 1, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> str:
    """Register random weights of CLIP ViT-L/14-336's text tower and projections (widths / `shrink`) and
    return the source name to pass as `clip_model=`: for timing runs on random weights of the real shapes
    (reproduce/efficiency.py), where no checkpoint is downloaded. Uses the character-level tiny tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    key = f"random:clip-text-l14-336/{shrink}/{vision_width}/{torch.device(device)}/{dtype}"
    with _LOCK:
        if key not in _LOADED:
            tok = _tiny_clip_tokenizer()
            s = max(1, shrink)
            cfg = CLIPTextConfig(
                vocab_size=len(tok), hidden_size=768 // s, intermediate_size=3072 // s,
                num_hidden_layers=12 if s == 1 else 2, num_attention_heads=12 if s == 1 else 2,
                projection_dim=768 // s, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
            )  # fmt: skip
            with torch.device(device):
                text = CLIPTextModelWithProjection(cfg).to(dtype).eval()
                visual = nn.Linear(vision_width, 768 // s, bias=False).to(dtype)
            _LOADED[key] = ClipText(tok, text.text_model, text.text_projection, visual, 77)
    return key


def default_clip_source(model: nn.Module) -> str:
    """The CLIP checkpoint for `model`: the tiny CLIP next to a tiny checkpoint, else DEFAULT_CLIP."""
    path = pathlib.Path(str(getattr(model, "name_or_path", "") or ""))
    if path.is_dir() and (path / _TINY_MARKER).is_file():
        return str(tiny_clip_path(path.parent))
    return DEFAULT_CLIP


# --- tiny CLIP (tests) ----------------------------------------------------------------------------------
def _tiny_clip_tokenizer():
    """Character-level CLIP tokenizer (byte alphabet + end-of-word forms), specials last as in CLIP."""
    from transformers import CLIPTokenizer

    from ..tiny import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for t in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(t, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[])


def _build_tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    from ..tiny import _VISION

    tok = _tiny_clip_tokenizer()
    text_config = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77,  # as CLIP: long instructions are split into 77-token segments
        # eos_token_id=2 selects CLIP's legacy pooling (the highest id, <|endoftext|>), like the
        # openai/clip-vit-large-patch14-336 config
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    # vision width 32 and projection 64 = the tiny LLaVA vision towers (their CLIPVisionConfig)
    vision_config = dict(
        hidden_size=_VISION["hidden_size"], intermediate_size=_VISION["intermediate_size"],
        num_attention_heads=_VISION["num_attention_heads"], num_hidden_layers=1, image_size=112, patch_size=14,
    )  # fmt: skip
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_CLIP_SEED)
        model = CLIPModel(config).eval()
    return model, tok


def tiny_clip_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Directory of the tiny random CLIP (built on first use), ``<cache_dir>/clip-v<TINY_CLIP_VERSION>``.

    `cache_dir` defaults to the tiny checkpoints' root (``~/.cache/vlmeval_dop/tiny``). Built in a temporary
    sibling and renamed into place, so concurrent builders agree on one complete directory.
    """
    import transformers

    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else pathlib.Path.home() / ".cache" / "vlmeval_dop" / "tiny"
    path = root / f"clip-v{TINY_CLIP_VERSION}"
    meta = {"family": "clip", "version": TINY_CLIP_VERSION, "seed": _TINY_CLIP_SEED,
            "transformers": transformers.__version__}  # fmt: skip
    try:
        if json.loads((path / _TINY_MARKER).read_text()) == meta:
            return path
    except (OSError, ValueError):
        pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=root))
    try:
        model, tok = _build_tiny_clip()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _TINY_MARKER).write_text(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp, 0o755)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / _TINY_MARKER).is_file():  # nobody else finished first
                raise
        return path
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["DEFAULT_CLIP", "ClipText", "default_clip_source", "load_clip_text", "tiny_clip_path"]

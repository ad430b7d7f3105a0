"""Reducer cost as a fraction of the pruned 7B prefill it enables, on CPU, measured in one run.

Inputs are random tensors of the real sizes: LLaVA-1.5 one crop of 576 patches -> 64 kept; LLaVA-NeXT
(672x672) 5 crops x 576 = 2880 patches (+48 row newlines in the span) -> 320 kept. LLM-input features
are 4096-d (7B width), CLIP feature-layer features 1024-d, CLIP joint-space embeddings 768-d. The prefill
reference is a random-weight LLaMA decoder of the 7B width (4096 / 11008 / 32 heads) with `--layers`
layers on the pruned sequence (n_v + `--text-tokens` tokens), timed and scaled to 32 layers.

Timed per reducer (selection only, features given): cdpruner (relevance + kernel + DPP; LLaVA-NeXT per crop
as the official code, and a single 2880 -> 320 DPP for reference), its CLIP text tower (random weights of
CLIP ViT-L/14's text tower on one 77-token segment), vispruner, visionzip, prumergeplus and trim (selection and
merging per crop, plus the projector on the merged tokens), divprune, uniform. TRIM also needs the CLIP
text tower (the cdpruner row).
Not timed: the extra vision-tower pass CDPruner(capture=False) makes for LLaVA (see cdpruner.py).

    python benchmarks/reducer_cost.py                 # ~1-2 min on 2 cores
    python benchmarks/reducer_cost.py --layers 1 --repeats 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prefill_seconds(tokens: int, layers: int, repeats: int) -> float:
    """Seconds of a 32-layer 7B-width prefill of `tokens` tokens, from `layers` timed layers."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=32, attn_implementation="sdpa")  # fmt: skip
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device="cpu").eval()
    for p in model.parameters():  # cheap non-degenerate weights (init of 400M params is slow)
        p.data.normal_(0, 0.02)
    x = torch.randn(1, tokens, 4096)
    with torch.no_grad():
        t = timed(lambda: model(inputs_embeds=x, use_cache=False), repeats)
    return t * 32 / layers


SETTINGS = (("LLaVA-1.5 576->64", 1, 64, 0), ("LLaVA-NeXT 2880->320", 5, 320, 48))  # (name, crops, n_keep, newlines)


def clip_text_case(device="cpu", dtype=torch.float32, shrink: int = 1):
    """Random weights of CLIP ViT-L/14's text tower on one 77-token segment: the call to time (`shrink` > 1:
    widths / shrink and 2 layers, for smoke tests)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    k = max(1, shrink)
    text_cfg = CLIPTextConfig(hidden_size=768 // k, intermediate_size=3072 // k, num_attention_heads=12 if k == 1 else 2,
                              num_hidden_layers=12 if k == 1 else 2, projection_dim=768 // k,
                              max_position_embeddings=77)  # fmt: skip
    with torch.device(device):
        clip_text = CLIPTextModelWithProjection(text_cfg).to(dtype).eval()
    ids = torch.randint(0, 49000, (1, 77)).to(device)

    def run():
        with torch.no_grad():
            return clip_text(input_ids=ids)

    return run


def reducer_cases(crops: int, n_keep: int, newlines: int, device="cpu", dtype=torch.float32, patches: int = 576,
                  width: int = 4096, clip_width: int = 1024, emb_width: int = 768) -> list[tuple[str, object]]:
    """(label, call) per reducer on random inputs of the given sizes (defaults: the real ones); label
    "cdpruner CLIP text tower" has call None (time `clip_text_case`)."""
    from vlmeval_dop.reducers import REDUCERS
    from vlmeval_dop.reducers.cdpruner import cdpruner_select, crop_quotas, relevance_scores
    from vlmeval_dop.reducers.divprune import divprune_select
    from vlmeval_dop.reducers.prumerge import budget_ratio, prumerge_plus_select
    from vlmeval_dop.reducers.trim import trim_scores, trim_select
    from vlmeval_dop.reducers.uniform import uniform_indices
    from vlmeval_dop.reducers.visionzip import visionzip_select, visionzip_split

    P = patches

    def rand(*shape):
        return torch.randn(*shape).to(device, dtype)

    feats = rand(crops, P, width)
    clip_feats = rand(crops, P, clip_width)
    img_emb = rand(crops, P, emb_width)
    txt_emb = rand(1, emb_width)
    cls_attn = torch.softmax(torch.randn(crops, P), dim=-1).to(device, dtype)
    quotas = crop_quotas([P] * crops, n_keep)

    def cd_per_crop():
        r = relevance_scores(img_emb, txt_emb)  # jointly over the image's crops
        return [cdpruner_select(feats[c], r[c], q) for c, q in enumerate(quotas)]

    def cd_single():
        return cdpruner_select(feats.reshape(-1, width), relevance_scores(img_emb, txt_emb).flatten(), n_keep)

    rows = [("cdpruner (DPP per crop)", cd_per_crop)]
    if crops > 1:
        rows.append((f"cdpruner (one DPP {crops * P})", cd_single))
    rows.append(("cdpruner CLIP text tower", None))
    if "vispruner" in REDUCERS:
        from vlmeval_dop.reducers.vispruner import vispruner_select

        rows.append(("vispruner (per crop)",
                     lambda: [vispruner_select(cls_attn[c], clip_feats[c], q) for c, q in enumerate(quotas)]))

    keys = rand(crops, 1 + P, 64)  # head-averaged keys, [CLS] first (VisionZip); PruMerge+: full width
    with_cls = torch.cat([rand(crops, 1, clip_width), clip_feats], dim=1)  # VisionZip keeps the [CLS] row
    full_keys = rand(crops, P, clip_width)
    with torch.device(device):
        proj = torch.nn.Sequential(torch.nn.Linear(clip_width, width), torch.nn.GELU(),
                                   torch.nn.Linear(width, width)).to(dtype)

    def visionzip():  # selection + merging per crop, then the projector on the merged tokens
        out = []
        for c, q in enumerate(quotas):
            dom, ctx_n = visionzip_split(q)
            out.append(visionzip_select(cls_attn[c], keys[c], with_cls[c], dom, ctx_n))
        with torch.no_grad():  # every row ([CLS] included) through the projector, as official
            proj(torch.cat([part.rows for part in out]))
        return out

    def prumerge():
        out = [prumerge_plus_select(cls_attn[c], full_keys[c], clip_feats[c], budget_ratio(P, max(q, 2)))
               for c, q in enumerate(quotas)]  # the ratio solved for q rows
        with torch.no_grad():
            proj(clip_feats[0, : n_keep // crops])
        return out

    def trim():  # scores + selection + one mean token per crop through the projector
        out = [trim_select(trim_scores(img_emb[c], txt_emb[0]), q) for c, q in enumerate(quotas)]
        with torch.no_grad():
            proj(clip_feats[:, :1].mean(1))
        return out

    rows += [("visionzip (per crop)", visionzip), ("prumergeplus (per crop)", prumerge), ("trim (per crop)", trim)]
    span = torch.cat([feats.reshape(-1, width), rand(newlines, width)])
    rows.append(("divprune (whole span)", lambda: divprune_select(span, n_keep)))
    rows.append(("uniform", lambda: uniform_indices(span.shape[0], n_keep)))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers timed (scaled to 32)")
    ap.add_argument("--text-tokens", type=int, default=135, help="non-visual tokens of the prompt")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    t_clip = timed(clip_text_case(), args.repeats)

    print(f"torch threads: {torch.get_num_threads()}; prefill = 7B width, {args.layers} layers timed x {32 / args.layers:g}")
    print(f"{'setting':<34}{'reducer':<28}{'reducer ms':>12}{'prefill ms':>12}{'ratio':>9}")
    for name, crops, n_keep, newlines in SETTINGS:
        rows = reducer_cases(crops, n_keep, newlines)
        prefill = prefill_seconds(n_keep + args.text_tokens, args.layers, args.repeats)
        for label, fn in rows:
            t = t_clip if fn is None else timed(fn, args.repeats)
            print(f"{name:<34}{label:<28}{t * 1e3:>12.1f}{prefill * 1e3:>12.0f}{t / prefill:>9.2%}")


if __name__ == "__main__":
    main()

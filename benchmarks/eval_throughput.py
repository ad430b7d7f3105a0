"""Evaluation throughput: samples/s of VLMEvalKit's one-sample loop vs `run.py --batch-size N`.

    python benchmarks/eval_throughput.py                                 # CPU: 2 layers of LLaVA-1.5-7B width
    python benchmarks/eval_throughput.py --layers 32 --vision-layers 24 --device cuda --dtype float16 \\
        --samples 160 --batch-sizes 1,8,16                               # GPU: the real LLaVA-1.5-7B shapes

Model: a random-weight stock `LlavaForConditionalGeneration` with LLaVA-1.5-7B's shapes (LLaMA width
4096 / 11008, 32 heads, vocabulary 32064; CLIP ViT-L/14-336 tower, width 1024, 336 px -> 576 visual tokens)
at `--layers` decoder and `--vision-layers` vision layers (real depth: 32 and 24), run through the project's
VLMEvalKit wrapper (`LLaVA15DOP`: its prompt, image preprocessing, and the DOP executor for `--policy`;
default `1,1,97`: 97 visual tokens kept by the uniform reducer in layer 0, none after it, a pruned entry at
this depth; `none` = the unpruned model). Tokenizer and processor are the tiny LLaVA checkpoint's at 336 px.
Nothing is downloaded.

Data: `--samples` generated images (DOP_Demo's shapes, 224 px) with questions of 3 to 40 words and the
short-answer prompt, in an in-memory VLMEvalKit dataset. Greedy decoding of `--max-new-tokens` tokens (random
weights never emit the stop token, so every row runs to the limit).

Loop: batch 1 is VLMEvalKit's own `vlmeval.inference.infer_data` (one `model.generate` per sample, its
pickle every 10 samples); N > 1 is `vlmeval_dop.batched_inference.infer_data_batched` (what `run.py
--batch-size N` runs), both timed end to end from an empty work directory after one warm-up batch. The
predictions of every batch size are checked equal to batch 1's (exact strings; float32 on CPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

QUESTION_WORDS = ("what colour is the largest shape in the picture and how many smaller shapes of the same "
                  "colour can be seen next to it on the left side of the image").split()


def build_model(layers: int, vision_layers: int, device: str, dtype: torch.dtype, attn: str = "sdpa"):
    """Random LLaVA-1.5-7B-shaped model (reduced depth) and the tiny LLaVA processor at 336 px."""
    from transformers import AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vlmeval_dop.tiny import tiny_path

    processor = AutoProcessor.from_pretrained(str(tiny_path("llava15")))
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    tok = processor.tokenizer
    image_token = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=576, projector_hidden_act="gelu")
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    model.generation_config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    return model, processor


def make_wrapper(model, processor, policy, max_new_tokens: int, device: str, dtype: str):
    """The project's LLaVA-1.5 VLMEvalKit wrapper around `model` (as `load()` would set it up)."""
    from vlmeval_dop.models.llava import LLaVA15DOP

    L = model.config.text_config.num_hidden_layers
    wrapper = LLaVA15DOP(tiny="llava15", entry="bench", policy=policy, reducer="uniform" if policy else None,
                         max_new_tokens=max_new_tokens, device=device, dtype=dtype)
    if policy is not None:
        policy.validate(L)
    wrapper._model, wrapper._processor, wrapper._num_layers = model, processor, L
    return wrapper


def make_dataset(n: int):
    """An in-memory VLMEvalKit dataset of n DOP_Demo-style samples with questions of 3-40 words."""
    import pandas as pd

    from vlmeval_dop.datasets import DOPDemoDataset, demo_samples

    base = demo_samples()
    rows = []
    for i in range(n):
        words = 3 + (i * 7) % 38
        question = " ".join(QUESTION_WORDS[(i + k) % len(QUESTION_WORDS)] for k in range(words)) + "?"
        rows.append({**base[i % len(base)], "index": i, "question": question})

    class ThroughputData(DOPDemoDataset):
        DATASET_URL = {"DOP_Throughput": ""}

        def load_data(self, dataset):
            return pd.DataFrame(rows)

    return ThroughputData("DOP_Throughput")


def run_loop(model, dataset, batch_size: int, work: str) -> tuple[float, dict]:
    """(seconds, predictions) of one inference pass over `dataset` from an empty work directory."""
    import vlmeval.inference as vinf

    from vlmeval_dop.batched_inference import infer_data_batched

    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, f"01_{dataset.dataset_name}.pkl")
    kw = dict(model=model, model_name="bench", work_dir=work, dataset=dataset, out_file=out)
    t = time.perf_counter()
    if batch_size == 1:
        vinf.infer_data(**kw)
    else:
        infer_data_batched(**kw, batch_size=batch_size, original=vinf.infer_data)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    from vlmeval.smp import load

    return seconds, load(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (LLaVA-1.5-7B: 32)")
    ap.add_argument("--vision-layers", type=int, default=2, help="CLIP layers (ViT-L/14-336: 24)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--policy", default="1,1,97", help="d_A,d_P,n_v of the pruned entry, or none (unpruned)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    args = ap.parse_args(argv)

    os.environ.setdefault("LMUData", tempfile.mkdtemp(prefix="lmu_"))  # VLMEvalKit writes the images there
    from vlmeval_dop.policy import DOPPolicy

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    if sizes[0] != 1:
        raise SystemExit("the first batch size must be 1 (the reference loop)")
    policy = None
    if args.policy != "none":
        policy = DOPPolicy(*[None if x == "none" else int(x) for x in args.policy.split(",")])
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model, processor = build_model(args.layers, args.vision_layers, args.device, dtype)
    wrapper = make_wrapper(model, processor, policy, args.max_new_tokens, args.device, args.dtype)
    dataset = make_dataset(args.samples)
    print(f"# LLaVA-1.5-7B width, {args.layers} decoder / {args.vision_layers} vision layers, random weights, "
          f"{args.device} {args.dtype}, torch threads {torch.get_num_threads()}; policy {policy or 'unpruned'}; "
          f"{args.samples} samples, {args.max_new_tokens} new tokens (built in {time.perf_counter() - t0:.1f} s)")

    root = tempfile.mkdtemp(prefix="throughput_")
    warm = make_dataset(max(sizes))
    warm.data = warm.data.iloc[: max(sizes)]
    run_loop(wrapper, warm, max(sizes), os.path.join(root, "warm"))  # first-call costs out of the timings

    results, reference = [], None
    for size in sizes:
        seconds, preds = run_loop(wrapper, dataset, size, os.path.join(root, f"bs{size}"))
        if reference is None:
            reference = preds
        same = preds == reference
        results.append((size, seconds, args.samples / seconds, same))
        base = results[0][2]
        print(f"batch {size:3d}: {seconds:8.1f} s  {args.samples / seconds:7.3f} samples/s  "
              f"x{args.samples / seconds / base:5.2f} vs VLMEvalKit's loop  predictions equal: {same}", flush=True)
    return 0 if all(r[3] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

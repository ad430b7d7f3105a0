"""PDrop on the tiny models: per-layer token counts equal the analytic schedule (official int() counts),
measured FLOPs equal the analytic model plus the ranking cost, padded batches rank each sample alone."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.baselines.pdrop import PDrop, pdrop_kept_counts, pdrop_layer_tokens, pdrop_selection_flops
from vlmeval_dop.flops import schedule_flops
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs


def test_pdrop_pyramid_counts_and_flops():
    model, processor = load_tiny("llava15", attn_implementation="eager")  # FlopCounter sees eager matmuls
    inputs = tiny_inputs("llava15", processor, ["What is shown in the picture?"], [tiny_image(0)])
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n = inputs["input_ids"].shape[1]
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    ratio = 0.45  # 64 -> 28 -> 12 -> 5 (ceil of lambda x previous would give 29, 14, 7)
    assert pdrop_kept_counts(n_vis, [ratio, ratio**2, ratio**3]) == [28, 12, 5]
    counter = FlopCounterMode(display=False)
    with apply_dop(model, DOPPolicy.full(L), token_pruner=PDrop(boundaries=[1, 2, 3], ratio=ratio)) as handle:
        with torch.no_grad(), counter:
            model(**inputs, use_cache=False)
    expect = pdrop_layer_tokens(L, [1, 2, 3], n_vis, ratio, n - n_vis)
    assert handle.last_layer_tokens == expect
    spec = ArchSpec.from_model(model, visual_tokens=n_vis)
    selection = sum(pdrop_selection_flops(spec, expect[i][0]) for i in (0, 1, 2))
    measured = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith(tuple(
        f"language_model.layers.{i}" for i in range(L))))  # fmt: skip
    assert abs(measured - schedule_flops(spec, expect) - selection) <= 0.01 * measured


def test_pdrop_padded_batch_ranks_each_sample_alone():
    """Two prompts of different lengths in one padded batch keep the same tokens as each run alone."""
    model, processor = load_tiny("llava15")
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    prompts, images = ["What is shown in the picture? Describe it.", "Color?"], [tiny_image(0), tiny_image(1)]

    class Spy(PDrop):
        def select(self, ctx):
            d = super().select(ctx)
            self.kept.append([torch.nonzero((ctx.visual & ctx.alive & ~d.drop)[b]).flatten() - torch.nonzero(ctx.visual[b])[0] for b in range(d.drop.shape[0])])
            return d

    def kept(batch):
        spy = Spy(boundaries=[1, 2, 3], ratio=0.5)
        spy.kept = []
        with apply_dop(model, DOPPolicy.full(L), token_pruner=spy), torch.no_grad():
            model(**batch)
        return spy.kept

    both = kept(tiny_inputs("llava15", processor, prompts, images))
    for b in range(2):
        alone = kept(tiny_inputs("llava15", processor, [prompts[b]], [images[b]]))
        for stage_both, stage_alone in zip(both, alone):
            assert torch.equal(stage_both[b], stage_alone[0])


def test_pdrop_refuses_mrope():
    model, processor = load_tiny("qwen25vl")
    inputs = tiny_inputs("qwen25vl", processor, ["What is shown?"], [tiny_image(0)])
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    with apply_dop(model, DOPPolicy.full(L), token_pruner=PDrop(boundaries=[1, 2])), torch.no_grad():
        with pytest.raises(ValueError, match="1D RoPE"):
            model(**inputs)

"""FastV on the decoder-side hook: attention recomputed from q/k equals eager attention weights, the
selection is the top-k by hand, the schedule's token counts and measured FLOPs match the analytic model."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.baselines import get_decoder_pruner
from vlmeval_dop.baselines.fastv import FastV, fastv_layer_tokens, fastv_selection_flops
from vlmeval_dop.flops import schedule_flops
from vlmeval_dop.tiny import TINY_FAMILIES, load_tiny, tiny_image, tiny_inputs


class _Spy(FastV):
    """FastV that also records its scores and decision."""

    def select(self, ctx):
        self.seen_scores = self.scores(ctx)
        self.seen_drop = super().select(ctx)
        return self.seen_drop


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fastv_scores_selection_and_flops(family):
    model, processor = load_tiny(family, attn_implementation="eager")
    inputs = tiny_inputs(family, processor, ["What is shown in the picture?", "Color?"], [tiny_image(0), tiny_image(1)])
    visual = inputs["input_ids"] == model.config.image_token_id
    n_vis = int(visual[0].sum())
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    k, keep = 2, n_vis // 4

    with torch.no_grad():
        eager = model(**inputs, output_attentions=True).attentions[k - 1][:, :, -1, :].mean(1)
    spy = _Spy(k=k, keep=keep)
    with apply_dop(model, DOPPolicy.full(L), token_pruner=spy) as handle, torch.no_grad():
        model(**inputs)
    torch.testing.assert_close(spy.seen_scores, eager.float(), atol=1e-5, rtol=1e-4)

    # by hand: per sample, the `keep` visual tokens with the largest eager attention survive
    for b in range(2):
        vis_pos = torch.nonzero(visual[b]).flatten()
        top = set(vis_pos[torch.topk(eager[b, vis_pos], keep).indices].tolist())
        dropped = set(torch.nonzero(spy.seen_drop[b]).flatten().tolist())
        assert dropped == set(vis_pos.tolist()) - top

    n_text = [int((~visual[b] & inputs["attention_mask"][b].bool()).sum()) for b in range(2)]
    pad = [int((~inputs["attention_mask"][b].bool()).sum()) for b in range(2)]
    for b in range(2):  # padding tokens take part in every layer, like text
        expect = fastv_layer_tokens(L, k, n_vis, keep, n_text[b] + pad[b])
        assert [layer[b] for layer in handle.last_sample_layer_tokens] == expect

    single = tiny_inputs(family, processor, ["What is shown in the picture?"], [tiny_image(0)])
    counter = FlopCounterMode(display=False)
    with apply_dop(model, DOPPolicy.full(L), token_pruner=FastV(k=k, keep=keep)), torch.no_grad(), counter:
        model(**single, use_cache=False)
    measured = sum(
        sum(ops.values()) for name, ops in counter.get_flop_counts().items()
        if name.split(".")[-2:-1] == ["layers"] and "language_model" in name
    )
    spec = ArchSpec.from_model(model, visual_tokens=n_vis)
    n = single["input_ids"].shape[1]
    analytic = schedule_flops(spec, fastv_layer_tokens(L, k, n_vis, keep, n - n_vis))
    # the selection (one recomputed attention row) runs inside layer k-1 and is counted there
    assert abs(measured - analytic - fastv_selection_flops(spec, n)) <= 0.01 * analytic


def test_fastv_bad_input():
    with pytest.raises(ValueError, match="k >= 1"):
        FastV(k=0)
    with pytest.raises(ValueError, match="valid: .*fastv"):
        get_decoder_pruner("fastvv")


def test_fastv_per_step_entry_generates_without_cache(lmu_root):
    """`per_step: true` in an entry's baseline_args: the wrapper generates without a KV cache, so FastV re-ranks
    at every new token; its answer equals a loop of pruned forwards on the growing sequence (argmax)."""
    from vlmeval_dop.datasets import DOPDemoDataset
    from vlmeval_dop.registry import load_entry

    wrapper = load_entry("tiny_llava15_fastv", baseline_args={"k": 2, "keep": 16, "per_step": True}, max_new_tokens=4).load()
    ds = DOPDemoDataset("DOP_Demo")
    msg = ds.build_prompt(ds.data.iloc[1])
    calls = []
    generate = wrapper.model.generate
    wrapper.model.generate = lambda *a, **kw: calls.append(kw.get("use_cache")) or generate(*a, **kw)
    try:
        out = wrapper.generate(msg, dataset="DOP_Demo")
    finally:
        del wrapper.model.generate
    assert calls == [False]

    inputs = wrapper.model_inputs(msg, "DOP_Demo")
    ids, eos, new = inputs["input_ids"], wrapper.model.generation_config.eos_token_id, []
    with apply_dop(wrapper.model, DOPPolicy.full(4), token_pruner=FastV(k=2, keep=16)), torch.no_grad():
        for _ in range(wrapper.max_new_tokens):
            step = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
            tok = int(wrapper.model(**step, use_cache=False).logits[0, -1].argmax())
            if tok == eos:
                break
            new.append(tok)
            ids = torch.cat([ids, ids.new_tensor([[tok]])], dim=1)
    assert out == wrapper.decode(torch.tensor(new))


def test_fastv_per_step_refuses_a_cache():
    """A per-step pruner under a KV cache would silently rank once at prefill: refused by name."""
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, ["What?"], [tiny_image(seed=0)])
    with apply_dop(model, DOPPolicy.full(4), token_pruner=FastV(k=2, keep=16, per_step=True)), torch.no_grad():
        model(**inputs, use_cache=False)  # fine without a cache
        with pytest.raises(ValueError, match="per_step=True.*use_cache=False"):
            model.generate(**inputs, max_new_tokens=2)

"""Independent references shared by tests: the stock model's own decoder inputs (for the masked references
of the executor and SparseVLM tests), the stock model run on a sequence rebuilt by hand, and the checks the
merging reducers (VisionZip, PruMerge+) share."""
from __future__ import annotations

import torch

from vlmeval_dop import DOPPolicy, apply_dop


def stock_decoder_inputs(model, inputs) -> tuple[dict, torch.Tensor]:
    """The keyword arguments the stock model passes to its decoder stack (inputs_embeds with the image
    features in place, position_ids, ...) and its logits, from one forward without cache."""
    seen: dict = {}

    def grab(module, args, kwargs):
        if not seen:
            seen.update(kwargs)

    h = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
    finally:
        h.remove()
    return seen, logits


def stock_embeds(model, inputs):
    """The decoder inputs (image features in place) and logits of the stock model."""
    kwargs, logits = stock_decoder_inputs(model, inputs)
    return kwargs["inputs_embeds"], logits


def rebuilt_logits(model, emb, vis, kept, new_rows):
    """Stock model on inputs_embeds with the kept rows replaced and the dropped placeholders removed."""
    emb = emb.clone()
    emb[0, vis[kept]] = new_rows.to(emb)
    keep = torch.ones(emb.shape[1], dtype=torch.bool)
    keep[vis] = False
    keep[vis[kept]] = True
    with torch.no_grad():
        return model(inputs_embeds=emb[:, keep]).logits[0, -1]


def merged_rows(model, kept_parts, feature_parts) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-crop reference selections -> (kept placeholder indices in order, their projected decoder rows)."""
    kept, order = torch.sort(torch.cat(kept_parts))
    with torch.no_grad():
        return kept, model.model.multi_modal_projector(torch.cat(feature_parts)[order])


def assert_matches_rebuilt(model, inputs, handle, got, emb, stock, kept, rows) -> None:
    """A merging reducer through the executor (`got`: last-token logits, `handle`: its DOP handle) keeps the
    reference's tokens and equals the stock model on the sequence rebuilt from them, and differs from the
    unreduced model."""
    assert handle.last_kept[0].tolist() == kept.tolist()
    assert torch.isfinite(got).all()
    vis = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    torch.testing.assert_close(got, rebuilt_logits(model, emb, vis, kept, rows), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, stock[0, -1], atol=1e-4)  # the reduction did change something


def assert_all_tokens_is_stock(model, inputs, reducer: str) -> None:
    """Keeping every visual token, `reducer` under the full-depth policy is the stock model."""
    _, stock = stock_embeds(model, inputs)
    n_all = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    with apply_dop(model, DOPPolicy(4, 4, n_all), reducer=reducer) as handle, torch.no_grad():
        got = model(**inputs).logits
    assert handle.last_kept[0].tolist() == list(range(n_all))
    torch.testing.assert_close(got, stock, atol=1e-5, rtol=1e-5)


def replaced_span_logits(model, emb, vis, rows):
    """Stock model on inputs_embeds with the image placeholders `vis` (one contiguous span) replaced by
    `rows`, in order: the sequence the official LLaVA code builds with len(rows) image tokens."""
    seq = torch.cat([emb[0, : vis[0]], rows.to(emb), emb[0, vis[-1] + 1 :]])[None]
    with torch.no_grad():
        return model(inputs_embeds=seq).logits[0, -1]

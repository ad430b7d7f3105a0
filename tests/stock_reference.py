"""Independent references shared by the merging-reducer tests (VisionZip, PruMerge+): the stock model's own
decoder inputs, and the stock model run on a sequence rebuilt by hand."""
from __future__ import annotations

import torch


def stock_embeds(model, inputs):
    """The decoder inputs (image features in place) and logits of the stock model."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("e", kwargs["inputs_embeds"])

    h = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        h.remove()
    return seen["e"], logits


def rebuilt_logits(model, emb, vis, kept, new_rows):
    """Stock model on inputs_embeds with the kept rows replaced and the dropped placeholders removed."""
    emb = emb.clone()
    emb[0, vis[kept]] = new_rows.to(emb)
    keep = torch.ones(emb.shape[1], dtype=torch.bool)
    keep[vis] = False
    keep[vis[kept]] = True
    with torch.no_grad():
        return model(inputs_embeds=emb[:, keep]).logits[0, -1]

"""VLMEvalKit model wrappers (BaseModel) on stock transformers, one module per family.

Importing this package is cheap; a wrapper module (and with it vlmeval) is imported only by
`wrapper_class`, so the registry can list entries without importing vlmeval.
"""
from __future__ import annotations

import importlib

# wrapper family (eval_configs/entries.yaml `wrapper`) -> "module:class"
WRAPPERS: dict[str, str] = {
    "llava": "vlmeval_dop.models.llava:LLaVA15DOP",
    "llava_next": "vlmeval_dop.models.llava:LLaVANextDOP",
    "qwen2_5_vl": "vlmeval_dop.models.qwen2_5_vl:Qwen25VLDOP",
    "internvl": "vlmeval_dop.models.internvl3:InternVL3DOP",
    # models beyond the paper (issue 15)
    "qwen2_vl": "vlmeval_dop.models.qwen2_vl:Qwen2VLDOP",
    "internvl35": "vlmeval_dop.models.internvl35:InternVL35DOP",
    "llava_onevision": "vlmeval_dop.models.llava_onevision:LLaVAOneVisionDOP",
    "smolvlm": "vlmeval_dop.models.smolvlm:SmolVLMDOP",
    "qwen3_vl": "vlmeval_dop.models.qwen3_vl:Qwen3VLDOP",
    "video_llava": "vlmeval_dop.models.video_llava:VideoLLaVADOP",  # issue 14: videos and images
    "gemma3": "vlmeval_dop.models.gemma3:Gemma3DOP",
}


def wrapper_class(family: str) -> type:
    """The wrapper class of a family; unknown families list the valid ones."""
    if family not in WRAPPERS:
        raise KeyError(f"unknown wrapper family {family!r}; valid: {', '.join(WRAPPERS)}")
    module, cls = WRAPPERS[family].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["WRAPPERS", "wrapper_class"]

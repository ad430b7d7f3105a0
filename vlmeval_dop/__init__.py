"""vlmeval-dop: Depth-wise Operation Pruning (DOP) for multimodal LLMs, as a VLMEvalKit plugin.

The core (policy, arch, flops, executor, reducers, search) imports without vlmeval.
"""
from ._compat import check_transformers_version

check_transformers_version()

from .executor import DOPHandle, apply_dop  # noqa: E402
from .flops import policy_tflops  # noqa: E402
from .policy import DOPPolicy, OperationMask  # noqa: E402

__version__ = "0.1.0"

__all__ = ["DOPHandle", "DOPPolicy", "OperationMask", "apply_dop", "load_entry", "policy_tflops", "__version__"]


def __getattr__(name: str):
    # `load_entry` (registry entry -> VLMEvalKit model) resolves lazily: the wrappers import vlmeval,
    # which the core must not import.
    if name == "load_entry":
        from .registry import load_entry

        return load_entry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

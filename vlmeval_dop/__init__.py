"""vlmeval-dop: Depth-wise Operation Pruning (DOP) for multimodal LLMs, as a VLMEvalKit plugin.

The core (policy, arch, flops, executor, reducers, search) imports without vlmeval.
"""
from ._compat import check_transformers_version

check_transformers_version()

from .executor import DOPHandle, apply_dop  # noqa: E402
from .flops import policy_tflops  # noqa: E402
from .policy import DOPPolicy  # noqa: E402

__version__ = "0.1.0"

# `load_entry` (registry entry -> VLMEvalKit model) arrives with the plugin (registry.py).

__all__ = ["DOPHandle", "DOPPolicy", "apply_dop", "policy_tflops", "__version__"]

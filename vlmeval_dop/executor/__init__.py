"""Operation pruning inside stock transformers decoders (see core.py for how)."""
from .cache import DOPCache
from .core import SUPPORTED_ATTENTION, DOPHandle, FrozenTokens, apply_dop
from .families import FAMILIES, FamilyAdapter, adapter_for
from .token_pruner import DecoderPruneContext, DecoderTokenPruner

__all__ = ["DecoderPruneContext", "DecoderTokenPruner", "DOPCache", "DOPHandle", "FAMILIES", "FamilyAdapter", "FrozenTokens", "SUPPORTED_ATTENTION", "adapter_for", "apply_dop"]

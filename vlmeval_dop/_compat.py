"""Fail fast, at import, on a transformers release outside the tested range.

The executor wraps stock decoder layers and forwards their keyword arguments. transformers 5.24 renamed
`past_key_values` to `cache` and dropped `cache_position`; an untested release would fail deep inside a
forward with an unrelated-looking error, so we check the version once here instead.
"""
from __future__ import annotations

import transformers
from packaging.version import Version

TESTED_TRANSFORMERS = (Version("5.24.0"), Version("5.25.0"))  # [low, high)


def check_transformers_version(version: str | None = None) -> None:
    """Raise ImportError if `version` (default: the installed transformers) is outside the tested range."""
    found = Version(version or transformers.__version__)
    low, high = TESTED_TRANSFORMERS
    if not (low <= found < high):
        raise ImportError(
            f"vlmeval_dop supports transformers >={low},<{high} (decoder-layer call signature), "
            f"found {found}. Install a supported release: pip install 'transformers>={low},<{high}'"
        )

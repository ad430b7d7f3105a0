"""Where an entry's weights come from, and a clear error when they cannot be had.

transformers, asked for a Hugging Face id that is neither cached nor downloadable, retries for ~25 s and
then raises a generic OSError from deep inside `from_pretrained`. Entries fail early instead, with one
message that names the entry, the checkpoint, the cache that was searched and what to do.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


class WeightsUnavailableError(OSError):
    """An entry's checkpoint is neither on disk nor downloadable."""


def _who(hf_id: str, entry: str | None) -> str:
    return f"entry {entry!r} ({hf_id})" if entry else hf_id


def _hub_unreachable_reason() -> str | None:
    """None if the Hub can be reached, else why not (offline mode, DNS/connection failure)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "Hugging Face offline mode is on (HF_HUB_OFFLINE)"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        return f"the Hub ({constants.ENDPOINT}) cannot be reached: {exc}"
    return None


def weights_unavailable(hf_id: str, entry: str | None, reason: str) -> WeightsUnavailableError:
    from huggingface_hub import constants

    return WeightsUnavailableError(
        f"weights of {_who(hf_id, entry)} are not available offline: they are not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {reason}. Download them where the Hub is reachable "
        f"(`huggingface-cli download {hf_id}`) and copy the cache here, or give the wrapper a local "
        f"checkpoint directory (model_path=...)."
    )


def resolve_weights(hf_id: str, entry: str | None = None) -> str:
    """The `from_pretrained` argument for `hf_id` (a Hub id or a local directory), checked to be loadable.

    A cached snapshot (its config.json) or a reachable Hub passes; otherwise WeightsUnavailableError.
    """
    if os.path.isdir(hf_id):
        return hf_id
    if os.path.isabs(hf_id) or hf_id.startswith(".") or hf_id.count("/") != 1:
        raise WeightsUnavailableError(
            f"weights of {_who(hf_id, entry)}: {hf_id!r} is neither a checkpoint directory nor a Hub id (owner/name)"
        )
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hf_id, "config.json"), str):
        return hf_id
    reason = _hub_unreachable_reason()
    if reason is not None:
        raise weights_unavailable(hf_id, entry, reason)
    return hf_id

"""Reaching the Hugging Face Hub: whether it answers, and what to say when it does not.

Usage::

    if not hub_reachable():             # honours HF_HUB_OFFLINE; else one short connection attempt
        ...                             # read from the local cache only (local_files_only=True)
    message, hint = not_available("llava-hf/llava-1.5-7b-hf", "its processor")

Without this, a Hub backbone on a machine without network spends minutes in retries before failing.
Publishing to the Hub is ``lora_llava.publish``.
"""

from __future__ import annotations

import functools
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT = 3.0


@functools.cache
def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE is set or the Hub endpoint does not accept a connection within a few seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=CONNECT_TIMEOUT).close()
    except OSError:
        return False
    return True


def unreachable(e: BaseException) -> bool:
    """Whether ``e`` says the Hub could not be reached: an OSError, or the HTTP client's transport error (the
    httpx family huggingface_hub uses, whose errors are no OSError), found by class name in its hierarchy."""
    if isinstance(e, OSError):
        return True
    return any(
        c.__module__.split(".")[0].startswith("httpx") and c.__name__ in ("TransportError", "TimeoutException")
        for c in type(e).__mro__
    )


def offline_reason() -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return f"{urlparse(constants.ENDPOINT).hostname} did not answer within {CONNECT_TIMEOUT:.0f} s"


def not_available(repo_id: str, what: str = "it") -> tuple[str, str]:
    """(message, hint) for a Hub repo that is neither cached nor reachable."""
    from huggingface_hub import constants

    return (
        f"{repo_id!r}: {what} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot "
        f"be reached ({offline_reason()})",
        f"download it where there is network (hf download {repo_id}) and copy the cache here (HF_HOME), "
        "or point backbone at a local directory",
    )

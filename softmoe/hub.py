"""The Hugging Face Hub as ``pretrained=True`` meets it offline: whether its host answers, whether the weights a tag
names are cached, and the Hub client's offline mode, so a machine without network fails in one line at once instead
of the client's five retries with backoff (80 s of "Retrying in 8s" lines)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from urllib.parse import urlsplit


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub's host answers a TCP connection within ``timeout`` seconds, name lookup included
    (which a socket timeout does not bound: an offline resolver can take 20 s). Always True behind a proxy, which
    only the Hub client knows how to use."""
    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    answered = []

    def connect() -> None:
        with contextlib.suppress(OSError), socket.create_connection(address, timeout):
            answered.append(True)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answered)


def hub_weights_cached(hf_hub_id: str) -> bool:
    """Whether the Hub client's cache holds a weights file of ``hf_hub_id`` (the names timm loads)."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = hf_hub_id.partition("@")
    names = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo_id, name, revision=revision or None), str) for name in names)


@contextlib.contextmanager
def hub_offline(offline: bool):
    """The Hub client's offline mode (cached files only, no request) within the block when ``offline``."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before

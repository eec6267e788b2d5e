"""The HuggingFace hub, for the paper's scenarios: one check that stops a run at once when it is out of reach.

A hub scenario (``glue``, ``cifar``, ``dolly``) downloads its data and backbone with ``datasets`` and
``transformers``. Without network those libraries retry for a long time and then fail deep inside; the
check here answers in seconds and names the offline scenario to run instead. ``HF_HUB_OFFLINE=1`` skips
the network probe (the user says: use my local cache); a load that then fails gets the same message.
Local folders (a dataset or model saved to disk) never need the hub.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

#: Seconds the connectivity probe waits for a TCP connection to the hub.
PROBE_TIMEOUT_S = 3.0


class HubUnavailable(RuntimeError):
    """A hub scenario asked for data or weights the hub must provide, and the hub is out of reach."""


def hub_offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint (``HF_ENDPOINT`` or huggingface.co:443) opens in ``timeout``."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def unavailable_message(scenario: str, ids: list[str], offline: str, reason: str) -> str:
    return (f"scenario '{scenario}' needs the HuggingFace hub for {', '.join(ids)}, but {reason}. "
            f"Run the offline scenario instead: fltac run --config {offline} "
            f"(or point the scenario at local copies saved with save_to_disk / save_pretrained)")


def require_hub(scenario: str, ids: list[str], offline: str) -> None:
    """Raise :class:`HubUnavailable` now if any of ``ids`` must come from an unreachable hub.

    ``ids`` that are existing local paths need nothing; with ``HF_HUB_OFFLINE=1`` the loaders read the
    local cache and a miss surfaces as the same message (:func:`unavailable_message`).
    """
    remote = [i for i in ids if not Path(i).exists()]
    if not remote or hub_offline_requested():
        return
    if not hub_reachable():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise HubUnavailable(unavailable_message(scenario, remote, offline, f"{endpoint} cannot be reached"))

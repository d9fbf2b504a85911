"""Signed webhooks per the Standard Webhooks specification (CMS → origin).

A delivery carries ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and
``webhook-signature``: space-separated ``v1,<base64 HMAC-SHA256>`` signatures over
``"{id}.{timestamp}.{body}"``, keyed with the base64 part of a ``whsec_…`` secret. Several
signatures allow secret rotation: one valid signature is enough. A timestamp more than the
tolerance (5 minutes) away from ``now`` is refused, so a captured delivery cannot be replayed
later; redeliveries within the window are recognised by their id (the event log's job).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

from edgecache.errors import Unauthorized

__all__ = ["TOLERANCE_S", "WebhookVerificationError", "parse_secret", "sign", "verify"]

TOLERANCE_S = 300


class WebhookVerificationError(Unauthorized):
    code = "invalid_webhook_signature"


def parse_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; ``ValueError`` on anything else."""
    if not secret.startswith("whsec_"):
        raise ValueError("a webhook secret starts with 'whsec_'")
    try:
        key = base64.b64decode(secret[len("whsec_"):], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"the webhook secret is not base64 after 'whsec_': {exc}") from None
    if len(key) < 16:
        raise ValueError("the webhook secret is shorter than 16 bytes")
    return key


def _signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value a sender puts on ``body`` (``v1,<base64>``)."""
    digest = _signature(parse_secret(secret), msg_id, str(timestamp), body)
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float,
           tolerance_s: float = TOLERANCE_S) -> str:
    """The delivery's id when one of its signatures is valid and its timestamp is recent.

    ``headers`` must look names up case-insensitively (aiohttp's request headers do).
    Raises ``WebhookVerificationError`` (401) otherwise, naming what was wrong.
    """
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not msg_id or not timestamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        raise WebhookVerificationError("webhook-timestamp must be Unix seconds")
    if abs(now - int(timestamp)) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is more than {int(tolerance_s)} s from now")
    try:
        msg_id.encode()
    except UnicodeEncodeError:   # bytes that are not UTF-8 (kept as surrogates by aiohttp)
        raise WebhookVerificationError("webhook-id must be UTF-8 text") from None
    expected = _signature(parse_secret(secret), msg_id, timestamp, body)
    for item in signatures.split():
        version, _, value = item.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):   # ValueError: characters that are not ASCII
            continue
        if hmac.compare_digest(given, expected):
            return msg_id
    raise WebhookVerificationError("no valid v1 signature in webhook-signature")

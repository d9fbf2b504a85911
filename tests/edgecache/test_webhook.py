"""Standard Webhooks signatures: valid, forged, stale, rotated, malformed."""

from __future__ import annotations

import base64

import pytest
from multidict import CIMultiDict

from edgecache.webhook import WebhookVerificationError, parse_secret, sign, verify

SECRET = "whsec_" + base64.b64encode(b"a-secret-of-32-bytes-for-tests!!").decode()
OTHER = "whsec_" + base64.b64encode(b"another-secret-of-32-bytes-here!").decode()
BODY = b'{"tags": ["doc:42"]}'
NOW = 1_800_000_000


def headers(signature: str, msg_id: str = "msg_1", timestamp: int = NOW) -> CIMultiDict:
    return CIMultiDict({"Webhook-Id": msg_id, "Webhook-Timestamp": str(timestamp), "Webhook-Signature": signature})


def test_a_correctly_signed_delivery_verifies_and_names_its_id() -> None:
    assert verify(SECRET, headers(sign(SECRET, "msg_1", NOW, BODY)), BODY, NOW + 10) == "msg_1"


def test_signature_matches_the_specification_by_hand() -> None:
    import hashlib
    import hmac

    key = base64.b64decode(SECRET[len("whsec_"):])
    digest = hmac.new(key, f"msg_1.{NOW}.".encode() + BODY, hashlib.sha256).digest()
    assert sign(SECRET, "msg_1", NOW, BODY) == "v1," + base64.b64encode(digest).decode()


@pytest.mark.parametrize(("hdrs", "body", "needle"), [
    (lambda: headers(sign(OTHER, "msg_1", NOW, BODY)), BODY, "no valid v1 signature"),
    (lambda: headers(sign(SECRET, "msg_1", NOW, BODY)), BODY + b" ", "no valid v1 signature"),
    (lambda: headers(sign(SECRET, "msg_2", NOW, BODY)), BODY, "no valid v1 signature"),
    (lambda: headers(sign(SECRET, "msg_1", NOW - 301, BODY), timestamp=NOW - 301), BODY, "more than 300 s"),
    (lambda: headers(sign(SECRET, "msg_1", NOW + 301, BODY), timestamp=NOW + 301), BODY, "more than 300 s"),
    (lambda: headers("v2," + sign(SECRET, "msg_1", NOW, BODY)[3:]), BODY, "no valid v1 signature"),
    (lambda: headers("v1,not-base64!!"), BODY, "no valid v1 signature"),
    (lambda: CIMultiDict({"webhook-id": "msg_1"}), BODY, "missing"),
    (lambda: headers(sign(SECRET, "msg_1", NOW, BODY), timestamp="soon"), BODY, "Unix seconds"),
])
def test_forged_stale_and_malformed_deliveries_are_refused(hdrs, body: bytes, needle: str) -> None:
    with pytest.raises(WebhookVerificationError, match=needle) as info:
        verify(SECRET, hdrs(), body, NOW)
    assert info.value.status == 401


def test_one_valid_signature_among_several_is_enough_for_secret_rotation() -> None:
    both = f"{sign(OTHER, 'msg_1', NOW, BODY)} {sign(SECRET, 'msg_1', NOW, BODY)}"
    assert verify(SECRET, headers(both), BODY, NOW) == "msg_1"


@pytest.mark.parametrize("secret", ["plain", "whsec_***", "whsec_" + base64.b64encode(b"short").decode()])
def test_bad_secrets_are_refused(secret: str) -> None:
    with pytest.raises(ValueError):
        parse_secret(secret)

"""The bus's message signatures (edgecache/bus/base.py): anything but the right one is False, never an error."""

from __future__ import annotations

import pytest

from edgecache.bus.base import sign, signed_by

TOKEN = "node-token"
PAYLOAD = b'{"seq": 1}'


def test_the_right_signature_is_accepted() -> None:
    assert signed_by(TOKEN, PAYLOAD, sign(TOKEN, PAYLOAD))


@pytest.mark.parametrize("signature", [None, "", "0" * 64, sign("another-token", PAYLOAD), sign(TOKEN, b"{}"),
                                       sign(TOKEN, PAYLOAD).upper(), "é" * 64, "\ufffd" * 64, "\udc80" * 64,
                                       sign(TOKEN, PAYLOAD)[:-1] + "é"])
def test_any_other_signature_is_refused_without_raising(signature: str | None) -> None:
    assert signed_by(TOKEN, PAYLOAD, signature) is False

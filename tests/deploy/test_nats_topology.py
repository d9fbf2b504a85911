"""deploy/nats works as docs/deploy.md says: an edge at a region's leaf node uses the hub's stream.

A hub (hub.conf) and the eu-west leaf (leaf-eu-west.conf, including leaf.conf) run on loopback,
unchanged but for their addresses and the JetStream folder. An edge's client at the leaf
creates the stream and a durable consumer with the plain JetStream API, the origin's client
at the hub publishes, and the edge receives and acknowledges the event.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from tests.deploy.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub_and_leaf(tmp_path: Path) -> Iterator[dict[str, int]]:
    ports = {name: free_port() for name in ("hub", "hub_http", "hub_leaf", "leaf", "leaf_http")}
    src = ROOT / "deploy" / "nats"
    hub = (src / "hub.conf").read_text(encoding="utf-8")
    for old, new in (("0.0.0.0:4222", ports["hub"]), ("0.0.0.0:8222", ports["hub_http"]),
                     ("0.0.0.0:7422", ports["hub_leaf"])):
        assert old in hub
        hub = hub.replace(old, f"127.0.0.1:{new}")
    hub = hub.replace("/data/jetstream", str(tmp_path / "jetstream"))
    leaf = (src / "leaf.conf").read_text(encoding="utf-8")
    leaf = leaf.replace("0.0.0.0:4222", f"127.0.0.1:{ports['leaf']}").replace("0.0.0.0:8222", f"127.0.0.1:{ports['leaf_http']}")
    (tmp_path / "hub.conf").write_text(hub, encoding="utf-8")
    (tmp_path / "leaf.conf").write_text(leaf, encoding="utf-8")
    shutil.copy(src / "leaf-eu-west.conf", tmp_path)
    env = {"PATH": os.environ["PATH"], "NATS_LEAF_PASSWORD": "pw",
           "NATS_HUB_LEAF_URL": f"nats-leaf://leaf:pw@127.0.0.1:{ports['hub_leaf']}"}
    procs = [subprocess.Popen(["nats-server", "-c", str(tmp_path / conf)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for conf in ("hub.conf", "leaf-eu-west.conf")]
    try:
        deadline = time.monotonic() + 20
        while True:   # until the hub lists the eu-west leaf (a deadline, not a fixed wait)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['hub_http']}/leafz", timeout=1) as resp:
                    leafz = json.load(resp)
                if leafz.get("leafnodes") == 1:
                    break
            except OSError:
                pass
            assert all(p.poll() is None for p in procs), "a nats-server exited"
            assert time.monotonic() < deadline, "the leaf node did not connect to the hub"
            time.sleep(0.05)
        yield ports
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


async def test_edge_at_a_leaf_consumes_the_hubs_stream(hub_and_leaf: dict[str, int]) -> None:
    edge = await nats.connect(f"nats://127.0.0.1:{hub_and_leaf['leaf']}")
    origin = await nats.connect(f"nats://127.0.0.1:{hub_and_leaf['hub']}")
    try:
        js = edge.jetstream()   # the plain API, as edgecache's bus uses it
        await js.add_stream(name="EDGECACHE", subjects=["edgecache.events"])
        sub = await js.pull_subscribe("edgecache.events", durable="edge_eu-west_0", stream="EDGECACHE")
        ack = await origin.jetstream().publish("edgecache.events", b'{"seq": 1}')
        assert (ack.stream, ack.seq, ack.domain) == ("EDGECACHE", 1, "hub")
        msgs = await sub.fetch(1, timeout=5)
        assert [m.data for m in msgs] == [b'{"seq": 1}']
        await msgs[0].ack_sync(timeout=5)
        info = await origin.jetstream().consumer_info("EDGECACHE", "edge_eu-west_0")
        assert (info.num_ack_pending, info.delivered.stream_seq, info.ack_floor.stream_seq) == (0, 1, 1)
    finally:
        await edge.close()
        await origin.close()

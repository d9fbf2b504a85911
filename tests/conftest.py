"""Shared fixtures: a real topology (simulated GPU servers, origin, edge nodes) on loopback."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edgecache.config import (
    BackendConfig,
    BusConfig,
    Config,
    NodeConfig,
    OriginConfig,
    SimConfig,
    TenantConfig,
)
from nodes.app import create_app
from origin.app import create_origin_app
from origin.sim.app import create_sim_app

NODE_TOKEN = "test-node-token"
FAST_SIM = SimConfig(count=0, time_scale=0.0, default_max_tokens=12)


def require_service(name: str, host: str, port: int) -> None:
    """Skip when a local service is down, except under CI where it must be up."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} at {host}:{port} is not reachable, and CI=true requires it")
        pytest.skip(f"{name} at {host}:{port} is not reachable")


@dataclass
class Stack:
    """A running topology. ``edges`` maps region -> base URL."""

    origin_url: str
    sim_urls: list[str]
    edges: dict[str, str]
    servers: dict[str, TestServer] = field(default_factory=dict)
    node_configs: dict[str, NodeConfig] = field(default_factory=dict)
    config: Config | None = None     # the origin's

    async def metric(self, url: str, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample (all label sets matching ``labels``) read over HTTP."""
        async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
            text = await resp.text()
        total = 0.0
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if not m or m.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    async def origin_requests(self) -> float:
        return await self.metric(self.origin_url, "edgecache_origin_requests_total")


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(tmp_path: Path) -> StackFactory:
    servers: list[TestServer] = []

    async def start(app: web.Application) -> TestServer:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    async def factory(*, regions: tuple[str, ...] = ("us-east",), sims: int = 2, sim: SimConfig = FAST_SIM,
                      tenants: tuple[TenantConfig, ...] = (), backends: tuple[str, ...] = (),
                      node_overrides: dict | None = None, origin_overrides: dict | None = None,
                      data_root: Path | None = None, bus: BusConfig | None = None) -> Stack:
        stack = Stack(origin_url="", sim_urls=[], edges={})
        for i in range(sims):
            server = await start(create_sim_app(sim))
            stack.sim_urls.append(str(server.make_url("")).rstrip("/"))
            stack.servers[f"sim{i}"] = server
        urls = list(backends) + stack.sim_urls
        config = Config(origin=OriginConfig(retries=2, first_byte_timeout_s=10, **(origin_overrides or {})),
                        backends=tuple(BackendConfig(url=u) for u in urls),
                        sim=replace(sim, count=0),
                        tenants=tenants, bus=bus or BusConfig())
        config = replace(config, auth=replace(config.auth, node_token=NODE_TOKEN))
        stack.config = config
        origin = await start(create_origin_app(config))
        stack.servers["origin"] = origin
        stack.origin_url = str(origin.make_url("")).rstrip("/")
        for region in regions:
            node = NodeConfig(region=region, port=0, data_dir=str((data_root or tmp_path) / region),
                              origin_url=stack.origin_url, node_token=NODE_TOKEN, tenants=tenants,
                              memory_bytes=64 * 1024 * 1024, disk_bytes=256 * 1024 * 1024,
                              origin_timeout_s=10, bus=bus or BusConfig())
            if node_overrides:
                node = replace(node, **node_overrides)
            server = await start(create_app(node))
            stack.servers[region] = server
            stack.node_configs[region] = node
            stack.edges[region] = str(server.make_url("")).rstrip("/")
        return stack

    yield factory
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


@pytest.fixture
async def serve_app() -> Callable[[web.Application], Awaitable[str]]:
    """Start any aiohttp application on loopback; returns its base URL."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in reversed(servers):
        await server.close()


@pytest.fixture(scope="session")
def model_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where the exported embedding model lives: pytest's cache, so the export (10-15 s) happens
    once per machine (its file name is the model's fingerprint); a folder of this run without it."""
    from edgecache.stores.embed import missing_semantic_packages

    if missing_semantic_packages():
        pytest.skip(f"semantic extra missing: {missing_semantic_packages()}")
    cache = getattr(request.config, "cache", None)
    return str(cache.mkdir("edgecache-onnx-models") if cache else tmp_path_factory.mktemp("onnx-models"))


@pytest.fixture(autouse=True)
def blockbuster():
    """Fail any test whose event loop thread makes a blocking call (file, socket, sleep, sqlite)."""
    from blockbuster import blockbuster_ctx

    with blockbuster_ctx() as bb:
        yield bb


async def async_openai(base_url: str, api_key: str = "sk-test"):
    """An ``openai.AsyncOpenAI`` client, built off the loop (its constructor reads package metadata)."""
    return await asyncio.to_thread(openai.AsyncOpenAI, base_url=base_url, api_key=api_key, max_retries=0)

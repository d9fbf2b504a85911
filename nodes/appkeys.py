"""What the edge node's modules share: the application's and the request's keys, the endpoints."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from edgecache.config import NodeConfig
from edgecache.trace import Span
from nodes.state import NodeState

__all__ = ["CACHE_STATUS", "CONFIG", "ENDPOINTS", "JSON", "NODE", "READY", "SPAN", "SSE", "TENANT", "WORKER"]

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
JSON = "application/json"
SSE = "text/event-stream"

NODE = web.AppKey("node", NodeState)
CONFIG = web.AppKey("config", NodeConfig)
CACHE_STATUS = web.RequestKey("cache_status", str)
SPAN = web.RequestKey("span", Span)   # this edge's span of the request
TENANT = web.RequestKey("tenant", str)   # the request's tenant, once its key was accepted
READY = web.AppKey("ready", Callable[[], bool])
WORKER = web.AppKey("worker", int)

"""One configuration object for a whole deployment, read from a TOML topology file.

``load_config(path, environ)`` is the only reader of files and environment variables.
Every section, key, default and environment override is documented in the dataclass
docstrings below and in ``docs/configuration.md``.

A topology file looks like ``deploy/local.toml``::

    [auth]                       # secrets; each one overridable by the environment
    admin_token = "..."          # EDGECACHE_ADMIN_TOKEN
    node_token = "..."           # EDGECACHE_NODE_TOKEN
    webhook_secret = "whsec_..." # EDGECACHE_WEBHOOK_SECRET

    [origin]
    port = 8100

    [sim]                        # simulated GPU servers started by `edgecache up`
    count = 4
    base_port = 8201

    [[backends]]                 # real inference servers (instead of, or besides, [sim])
    url = "http://10.0.0.7:8000"

    [[edges]]
    region = "us-east"
    port = 8101

    [[tenants]]                  # optional: when present, only listed keys are accepted
    name = "acme"
    api_keys = ["sk-acme-1"]
    semantic_max_false_hit_rate = 0.005   # optional: this tenant's own bound (or policy, or none)
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgecache.errors import ConfigError
from edgecache.webhook import parse_secret

__all__ = [
    "AuthConfig",
    "BackendConfig",
    "BusConfig",
    "Config",
    "NodeConfig",
    "OriginConfig",
    "SemanticConfig",
    "SimConfig",
    "TenantConfig",
    "load_config",
    "parse_config",
]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Shared secrets.

    admin_token: bearer token of the admin APIs (purge, prefixes). Env ``EDGECACHE_ADMIN_TOKEN``.
    node_token: bearer token edge nodes present to the origin. Env ``EDGECACHE_NODE_TOKEN``.
    webhook_secret: ``whsec_…`` secret of the CMS webhook. Env ``EDGECACHE_WEBHOOK_SECRET``.
    """

    admin_token: str = "dev-admin-token"
    node_token: str = "dev-node-token"
    webhook_secret: str = "whsec_ZGV2LXdlYmhvb2stc2VjcmV0LWNoYW5nZS1tZQ=="


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant and the API keys that belong to it. name: the tenant's scope id.

    The semantic tier, per tenant (its entries never serve another tenant anyway):
    semantic: false keeps the tenant's requests out of it (no semantic hits, and its answers
    never serve paraphrases) (true). semantic_policy_path: the tenant's own calibration, from
    ``edgecache calibrate`` on pairs like its traffic ("" = the node's ``semantic.policy_path``).
    semantic_max_false_hit_rate: the tenant's bound (0 = the node's ``semantic.max_false_hit_rate``).
    """

    name: str
    api_keys: tuple[str, ...] = ()
    semantic: bool = True
    semantic_policy_path: str = ""
    semantic_max_false_hit_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Simulated vLLM-like GPU servers (``edgecache sim``).

    count: servers started by ``edgecache up`` (default 4; 0 for none).
    host: bind address (default 127.0.0.1). base_port: first port, the others follow (8201).
    model: served model name (``sim-llm``).
    block_size: tokens per KV block (16). kv_capacity_blocks: KV cache size in blocks (4096).
    prefill_tokens_per_s: prefill rate for uncached prompt tokens (20000).
    decode_step_s: one decode step with a single running sequence, seconds (0.01).
    decode_step_per_seq_s: extra seconds per decode step for each further running sequence (0.0005).
    max_running: running sequences at most; the rest wait in a queue (32).
    max_waiting: waiting requests at most; beyond it, 429 (1024).
    max_model_len: prompt + completion tokens at most (8192).
    default_max_tokens: completion tokens when the request sets none (32).
    time_scale: multiplies every simulated delay; 0 answers at once (1.0).
    """

    count: int = 4
    host: str = "127.0.0.1"
    base_port: int = 8201
    model: str = "sim-llm"
    block_size: int = 16
    kv_capacity_blocks: int = 4096
    prefill_tokens_per_s: float = 20000.0
    decode_step_s: float = 0.01
    decode_step_per_seq_s: float = 0.0005
    max_running: int = 32
    max_waiting: int = 1024
    max_model_len: int = 8192
    default_max_tokens: int = 32
    time_scale: float = 1.0


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """An OpenAI-compatible inference server. url: base URL without ``/v1``.
    api_key: bearer key sent to it (optional). name: label in metrics, logs and ``/health``
    (defaults to the URL's scheme://host:port, never its credentials)."""

    url: str
    api_key: str | None = None
    name: str = ""


@dataclass(frozen=True, slots=True)
class OriginConfig:
    """The origin service.

    host/port: bind address (127.0.0.1:8100). url: how edges reach it (default from host/port;
    env ``EDGECACHE_ORIGIN_URL``).
    routing: backend selection policy: ``round_robin`` (default), ``least_loaded`` or
    ``prefix_aware`` (see ``origin/routing.py``).
    connect_timeout_s: to a backend (2.0). first_byte_timeout_s: until response headers (60).
    read_timeout_s: longest silence inside a streamed answer (60).
    retries: further backends tried before the first byte (2).
    max_body_bytes: largest request body accepted (4 MiB).
    data_dir: folder of the prefix registry (default ``var/origin`` in the parent of the topology file's folder).
    max_prefix_bytes: largest prefix text accepted (1 MiB).
    warm_prefixes: prefill a new or changed prefix on the backend(s) it will be routed to (true).
    health_interval_s: how often each backend's ``/health`` is checked; 0 never (5).
    health_timeout_s: a health check or ``/metrics`` read slower than this fails (2).
    metrics_interval_s: how often each backend's ``/metrics`` is read; 0 never (2).
    breaker_failures: consecutive failed requests that open a backend's circuit (5).
    breaker_cooldown_s: seconds an open circuit waits before one probe request (10).
    prefix_cache_threshold: ``prefix_aware``: a match below this share of the prompt is short
    and the request goes to the backend with most room among those in balance (0.5).
    prefix_balance_abs: ``prefix_aware``: the best-matching backend is overloaded when its
    requests in flight exceed the least-loaded one's by more than this (8) ...
    prefix_balance_rel: ... and by more than this factor (1.5).
    prefix_tree_chars: ``prefix_aware``: prompt characters remembered per backend (4000000).
    coalesce: identical requests in flight (same tenant, endpoint, prefix version, canonical request
    and wire format) share one backend request, streamed live to each (true); see ``origin/coalesce.py``.
    coalesce_max_waiters: requests sharing one backend request at most, the first included (256);
    further identical ones go to a backend on their own.
    coalesce_max_flights: coalescable backend requests in flight at most (4096); beyond, requests
    are not coalesced.
    max_in_flight_per_backend: requests in flight on one backend at most (256, vLLM's default
    ``max_num_seqs``); 0 is no bound. A request finding every usable backend full waits in the queue.
    queue_size: requests waiting for a backend slot at most (1024); beyond it, or after
    ``queue_timeout_s``, the origin answers 429 ``origin_overloaded`` with ``Retry-After``.
    queue_timeout_s: longest wait for a backend slot, seconds (5).
    retry_after_s: ``Retry-After`` of the origin's own 429, seconds (1).
    shield: the origin shield, one cache shared by every edge (true): a miss at one edge for an
    answer another edge already caused is answered without a backend request; same key, tags,
    TTL and purges as the edges' entries (see ``origin/shield.py``).
    shield_bytes: the shield's bound, bytes of entries (256 MiB); least recently used go first.
    shield_max_entry_bytes: the largest answer the shield stores, bytes (8 MiB).
    """

    host: str = "127.0.0.1"
    port: int = 8100
    url: str = ""
    routing: str = "round_robin"
    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 60.0
    read_timeout_s: float = 60.0
    retries: int = 2
    max_body_bytes: int = 4 * MiB
    data_dir: str = ""
    max_prefix_bytes: int = 1 * MiB
    warm_prefixes: bool = True
    health_interval_s: float = 5.0
    health_timeout_s: float = 2.0
    metrics_interval_s: float = 2.0
    breaker_failures: int = 5
    breaker_cooldown_s: float = 10.0
    prefix_cache_threshold: float = 0.5
    prefix_balance_abs: int = 8
    prefix_balance_rel: float = 1.5
    prefix_tree_chars: int = 4_000_000
    coalesce: bool = True
    coalesce_max_waiters: int = 256
    coalesce_max_flights: int = 4096
    max_in_flight_per_backend: int = 256
    queue_size: int = 1024
    queue_timeout_s: float = 5.0
    retry_after_s: int = 1
    shield: bool = True
    shield_bytes: int = 256 * MiB
    shield_max_entry_bytes: int = 8 * MiB

    @property
    def base_url(self) -> str:
        return self.url or f"http://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SemanticConfig:
    """The semantic tier of every edge node (needs ``pip install edgecache[semantic]``).

    enabled: answer near-duplicate questions from cache (False).
    max_false_hit_rate: the error bound the hit threshold is calibrated to (0.01).
    policy_path: a calibration file from ``edgecache calibrate`` ("" = the shipped one).
    candidates: nearest neighbours checked per lookup (4).
    max_query_chars: longer questions never take semantic hits (500).
    batch_window_s: how long the micro-batcher waits for company when idle (0: it takes what
    queued while the previous call ran; a window only adds latency below saturation).
    max_batch: questions embedded in one call at most (32).
    max_queue: questions waiting for the embedder at most; beyond it, no semantic lookup (1024).
    save_interval_s: how often the vector index is written to the data folder (60).
    model_cache_dir: where the embedding model exported for onnxruntime is kept ("" = the user's
    cache folder, ``~/.cache/edgecache/models``). Env ``EDGECACHE_MODEL_CACHE``.
    """

    enabled: bool = False
    max_false_hit_rate: float = 0.01
    policy_path: str = ""
    candidates: int = 4
    max_query_chars: int = 500
    batch_window_s: float = 0.0
    max_batch: int = 32
    max_queue: int = 1024
    save_interval_s: float = 60.0
    model_cache_dir: str = ""


@dataclass(frozen=True, slots=True)
class BusConfig:
    """How invalidation events travel from the origin to every edge (see docs/invalidation.md).

    kind: ``embedded`` (default: edges long-poll the origin's log over HTTP) or ``nats``
    (a NATS JetStream stream; each edge worker a durable consumer).
    nats_url: server(s), comma-separated (``nats://127.0.0.1:4222``). Env ``EDGECACHE_NATS_URL``.
    stream: JetStream stream name (``EDGECACHE``). subject: subject of the events
    (``edgecache.events``); heartbeats and applied reports use ``<subject>.heartbeat`` and
    ``<subject>.applied``.
    heartbeat_s: how often an idle edge checks in with the origin: the long-poll timeout, or the
    NATS ping interval (2).
    wait_timeout_s: ``?wait=true`` gives up after this long unless the request says less (10).
    keep_events: the origin's log keeps at least the newest this many events (100000); an edge
    that fell further behind purges everything when it comes back.
    """

    kind: str = "embedded"
    nats_url: str = "nats://127.0.0.1:4222"
    stream: str = "EDGECACHE"
    subject: str = "edgecache.events"
    heartbeat_s: float = 2.0
    wait_timeout_s: float = 10.0
    keep_events: int = 100_000


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """One edge node.

    region: its name, used in ``Cache-Status`` (required). host/port: bind address.
    data_dir: folder of the disk tier (default ``var/<region>`` in the parent of the topology file's folder).
    memory_bytes: memory tier bound (256 MiB). disk_bytes: disk tier bound (4 GiB).
    default_ttl_s: TTL of a stored answer without ``X-EdgeCache-TTL`` (86400).
    max_ttl_s: the largest TTL a client may ask for (2592000, 30 days).
    max_body_bytes: largest request body accepted (4 MiB).
    max_entry_bytes: largest answer that is stored (8 MiB).
    origin_timeout_s: longest wait for the origin's first byte or between stream chunks (120).
    max_fills: origin requests in flight at once per worker (1024); a miss beyond it is a 429
    ``edge_overloaded`` with ``Retry-After`` (joining an identical fill in flight is always allowed).
    workers: processes serving the port with SO_REUSEPORT (1).
    prefix_refresh_s: how often the replica of the prefix registry is refreshed (5).
    max_staleness_s: a node that has not heard from the invalidation stream for this long stops
    serving tagged entries until it has caught up (60).
    instance: tells apart nodes of one region (pods of a Deployment): part of the node's identity
    on the bus (``<region>/<instance>/<worker>``); "" means the host name. Env ``EDGECACHE_INSTANCE``.
    """

    region: str
    host: str = "127.0.0.1"
    port: int = 8101
    data_dir: str = ""
    memory_bytes: int = 256 * MiB
    disk_bytes: int = 4096 * MiB
    default_ttl_s: float = 86400.0
    max_ttl_s: float = 30 * 86400.0
    max_body_bytes: int = 4 * MiB
    max_entry_bytes: int = 8 * MiB
    origin_timeout_s: float = 120.0
    max_fills: int = 1024
    workers: int = 1
    prefix_refresh_s: float = 5.0
    max_staleness_s: float = 60.0
    instance: str = ""
    origin_url: str = "http://127.0.0.1:8100"
    node_token: str = "dev-node-token"
    tenants: tuple[TenantConfig, ...] = ()
    semantic: SemanticConfig = SemanticConfig()
    bus: BusConfig = BusConfig()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Config:
    """A whole deployment: auth, origin, backends, simulated servers, edges and tenants."""

    auth: AuthConfig = field(default_factory=AuthConfig)
    origin: OriginConfig = field(default_factory=OriginConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    backends: tuple[BackendConfig, ...] = ()
    edges: tuple[NodeConfig, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()
    semantic: SemanticConfig = SemanticConfig()
    bus: BusConfig = BusConfig()
    source: str = "<defaults>"

    def sim_urls(self) -> list[str]:
        return [f"http://{self.sim.host}:{self.sim.base_port + i}" for i in range(self.sim.count)]

    def all_backends(self) -> tuple[BackendConfig, ...]:
        """Configured backends, then the simulated ones."""
        sims = tuple(BackendConfig(url=u, name=f"sim-{i + 1}") for i, u in enumerate(self.sim_urls()))
        return self.backends + sims

    def edge(self, region: str) -> NodeConfig:
        for edge in self.edges:
            if edge.region == region:
                return edge
        known = ", ".join(e.region for e in self.edges) or "none"
        raise ConfigError(f"{self.source}: no edge with region {region!r} (known: {known})")


_ENV_SECRETS = {
    "admin_token": "EDGECACHE_ADMIN_TOKEN",
    "node_token": "EDGECACHE_NODE_TOKEN",
    "webhook_secret": "EDGECACHE_WEBHOOK_SECRET",
}


def _build(cls: type, raw: Any, where: str, **extra: Any) -> Any:
    """Build dataclass ``cls`` from a TOML table, checking key names and value types."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        f = known.get(name)
        if f is None or name in extra:
            raise ConfigError(f"{where}.{name}: unknown key (expected one of {', '.join(sorted(known))})")
        kwargs[name] = _coerce(value, f.type, f"{where}.{name}")
    kwargs.update(extra)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    ann = str(annotation)
    if ann.startswith("tuple[str"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings")
        return tuple(value)
    if ann == "bool":
        ok = isinstance(value, bool)
    elif ann == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ann == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif ann in ("str", "str | None"):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{where}: expected {ann}, got {value!r}")
    if ann in ("int", "float") and value < 0:
        raise ConfigError(f"{where}: must not be negative, got {value!r}")
    return value


def parse_config(raw: Mapping[str, Any], environ: Mapping[str, str], *, source: str = "<config>",
                 base_dir: Path | None = None) -> Config:
    """Turn a parsed TOML document into a ``Config``; ``environ`` overrides secrets."""
    allowed = {"auth", "origin", "sim", "backends", "edges", "tenants", "semantic", "bus"}
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{source}: unknown section {key!r} (expected one of {', '.join(sorted(allowed))})")
    auth = _build(AuthConfig, raw.get("auth", {}), f"{source}: auth")
    auth = replace(auth, **{k: environ[v] for k, v in _ENV_SECRETS.items() if environ.get(v)})
    try:
        parse_secret(auth.webhook_secret)
    except ValueError as exc:
        raise ConfigError(f"{source}: auth.webhook_secret: {exc}") from None
    origin = _build(OriginConfig, raw.get("origin", {}), f"{source}: origin")
    if environ.get("EDGECACHE_ORIGIN_URL"):
        origin = replace(origin, url=environ["EDGECACHE_ORIGIN_URL"])
    if origin.url and not origin.url.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: origin.url: expected an http(s) URL, got {origin.url!r}")
    if not origin.data_dir:
        origin = replace(origin, data_dir=str((base_dir or Path.cwd()) / "var" / "origin"))
    routings = ("round_robin", "least_loaded", "prefix_aware")
    if origin.routing not in routings:
        raise ConfigError(f"{source}: origin.routing: expected one of {', '.join(routings)}, "
                          f"got {origin.routing!r}")
    if not 0 <= origin.prefix_cache_threshold <= 1 or origin.prefix_balance_rel < 1:
        raise ConfigError(f"{source}: origin: prefix_cache_threshold must be within 0..1 and "
                          f"prefix_balance_rel at least 1")
    if origin.breaker_failures < 1 or origin.prefix_tree_chars < 1:
        raise ConfigError(f"{source}: origin: breaker_failures and prefix_tree_chars must be >= 1")
    if origin.coalesce_max_waiters < 1 or origin.coalesce_max_flights < 1:
        raise ConfigError(f"{source}: origin: coalesce_max_waiters and coalesce_max_flights must be >= 1")
    if origin.shield_bytes < 0 or origin.shield_max_entry_bytes < 1:
        raise ConfigError(f"{source}: origin: shield_bytes must be >= 0 and shield_max_entry_bytes >= 1")
    sim = _build(SimConfig, raw.get("sim", {"count": 0}), f"{source}: sim")
    if sim.block_size < 1 or sim.kv_capacity_blocks < 1 or sim.max_running < 1:
        raise ConfigError(f"{source}: sim: block_size, kv_capacity_blocks and max_running must be >= 1")
    backends = tuple(
        _build(BackendConfig, b, f"{source}: backends[{i}]") for i, b in enumerate(_list(raw, "backends", source))
    )
    for i, b in enumerate(backends):
        if not b.url.startswith(("http://", "https://")):
            raise ConfigError(f"{source}: backends[{i}].url: expected an http(s) URL, got {b.url!r}")
    tenants = tuple(
        _build(TenantConfig, t, f"{source}: tenants[{i}]") for i, t in enumerate(_list(raw, "tenants", source))
    )
    for i, t in enumerate(tenants):
        if not t.name:
            raise ConfigError(f"{source}: tenants[{i}].name: expected a non-empty name")
        if not 0 <= t.semantic_max_false_hit_rate < 1:
            raise ConfigError(f"{source}: tenants[{i}].semantic_max_false_hit_rate: expected a rate between 0 "
                              "and 1 (0: the node's)")
    semantic = _build(SemanticConfig, raw.get("semantic", {}), f"{source}: semantic")
    if environ.get("EDGECACHE_MODEL_CACHE"):
        semantic = replace(semantic, model_cache_dir=environ["EDGECACHE_MODEL_CACHE"])
    if not 0 < semantic.max_false_hit_rate < 1:
        raise ConfigError(f"{source}: semantic.max_false_hit_rate: expected a rate between 0 and 1")
    if semantic.candidates < 1 or semantic.max_batch < 1 or semantic.max_queue < 1:
        raise ConfigError(f"{source}: semantic: candidates, max_batch and max_queue must be >= 1")
    bus = _build(BusConfig, raw.get("bus", {}), f"{source}: bus")
    if environ.get("EDGECACHE_NATS_URL"):
        bus = replace(bus, nats_url=environ["EDGECACHE_NATS_URL"])
    if bus.kind not in ("embedded", "nats"):
        raise ConfigError(f"{source}: bus.kind: expected embedded or nats, got {bus.kind!r}")
    if not all(u.strip().startswith(("nats://", "tls://", "ws://", "wss://")) for u in bus.nats_url.split(",")):
        raise ConfigError(f"{source}: bus.nats_url: expected nats:// URL(s), got {bus.nats_url!r}")
    if not bus.stream.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{source}: bus.stream: letters, digits, '-' and '_' only, got {bus.stream!r}")
    if not bus.subject or any(c in bus.subject for c in " *>") or bus.heartbeat_s <= 0 or bus.keep_events < 1:
        raise ConfigError(f"{source}: bus: subject must be a plain subject, heartbeat_s positive, keep_events >= 1")
    edges = []
    for i, e in enumerate(_list(raw, "edges", source)):
        where = f"{source}: edges[{i}]"
        if not isinstance(e, Mapping) or not isinstance(e.get("region"), str) or not e["region"]:
            raise ConfigError(f"{where}.region: required (a non-empty string)")
        for key in ("origin_url", "node_token", "tenants", "semantic", "bus"):
            if key in e:
                raise ConfigError(f"{where}.{key}: unknown key (set by the topology)")
        edge = _build(NodeConfig, e, where, origin_url=origin.base_url, node_token=auth.node_token,
                      tenants=tenants, semantic=semantic, bus=bus)
        if not edge.data_dir:
            edge = replace(edge, data_dir=str((base_dir or Path.cwd()) / "var" / edge.region))
        if environ.get("EDGECACHE_INSTANCE"):
            edge = replace(edge, instance=environ["EDGECACHE_INSTANCE"])
        if len(edge.instance) > 100 or "/" in edge.instance:
            raise ConfigError(f"{where}.instance: at most 100 characters, no '/', got {edge.instance!r}")
        if edge.workers < 1:
            raise ConfigError(f"{where}.workers: must be >= 1")
        edges.append(edge)
    regions = [e.region for e in edges]
    if len(set(regions)) != len(regions):
        raise ConfigError(f"{source}: edges: regions must be unique, got {regions}")
    return Config(auth=auth, origin=origin, sim=sim, backends=backends, edges=tuple(edges),
                  tenants=tenants, semantic=semantic, bus=bus, source=source)


def _list(raw: Mapping[str, Any], key: str, source: str) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {key}: expected an array of tables ([[{key}]])")
    return value


def load_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Config:
    """Read a topology file (or the embedded defaults when ``path`` is None)."""
    if path is None:
        return parse_config({}, environ, source="<defaults>")
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(raw, environ, source=str(p), base_dir=p.resolve().parent.parent)

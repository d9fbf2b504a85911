"""The ``edgecache`` command: run a whole topology, or one service of it.

    edgecache up [--topology deploy/local.toml]      every service, one process each
    edgecache origin --topology FILE                 the origin alone
    edgecache node --topology FILE --region NAME     one edge node
    edgecache sim --topology FILE --index N          one simulated GPU server (N from 0)
    edgecache config check FILE                      validate a topology file
    edgecache calibrate PAIRS --out POLICY.json      re-calibrate the semantic hit policy

This module is the composition root: it alone imports the services.

Logging: ``EDGECACHE_LOG_LEVEL`` (default WARNING; INFO adds one access-log line per
completion request, DEBUG one per health/metrics/poll request too) and
``EDGECACHE_LOG_FORMAT`` (``text``, the default, or ``json``: one JSON object per line,
see docs/observability.md), both read by every service process, node workers included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from edgecache.config import AuthConfig, Config, load_config
from edgecache.errors import ConfigError
from edgecache.logs import ContextFilter, JsonFormatter, TextFormatter

__all__ = ["LOG_FORMATS", "build_parser", "configure_logging", "main", "run_app"]

DEFAULT_TOPOLOGY = Path("deploy/local.toml")


def _topology(path: str | None) -> Config:
    if path is None:
        if not DEFAULT_TOPOLOGY.exists():
            raise ConfigError(f"no --topology given and {DEFAULT_TOPOLOGY} does not exist here")
        path = str(DEFAULT_TOPOLOGY)
    return load_config(path, os.environ)


LOG_FORMATS = ("text", "json")


def configure_logging(service: str, region: str | None = None, environ: dict[str, str] | None = None) -> None:
    """The root logger of this process: one stderr handler, text or JSON (``EDGECACHE_LOG_FORMAT``),
    at ``EDGECACHE_LOG_LEVEL``; records carry the current request's ids (``ContextFilter``)."""
    environ = os.environ if environ is None else environ
    kind = environ.get("EDGECACHE_LOG_FORMAT", "text").strip().lower() or "text"
    if kind not in LOG_FORMATS:
        raise ConfigError(f"EDGECACHE_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {kind!r}")
    level = environ.get("EDGECACHE_LOG_LEVEL", "WARNING").strip().upper() or "WARNING"
    if not isinstance(logging.getLevelName(level), int):
        raise ConfigError(f"EDGECACHE_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {level!r}")
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter(service, region) if kind == "json" else TextFormatter())
    handler.set_name("edgecache")
    root = logging.getLogger()
    for old in root.handlers[:]:
        if old.get_name() == "edgecache":   # ours, from an earlier call: replaced, others kept
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def run_app(app_factory, host: str, port: int, *, reuse_port: bool = False, listening=None) -> None:
    """Serve one aiohttp application until SIGINT/SIGTERM, on uvloop where available.

    ``listening``: a shared counter incremented once the socket accepts connections.
    """
    from aiohttp import web

    async def serve() -> None:
        runner = web.AppRunner(app_factory(), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=1024)
        await site.start()
        if listening is not None:
            with listening.get_lock():
                listening.value += 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        import uvloop
        runner_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner_factory = None
    with asyncio.Runner(loop_factory=runner_factory) as runner:
        runner.run(serve())


def _warn_development_secrets(host: str, secrets: dict[str, str]) -> None:
    """A service listening beyond loopback with a secret still at its development default is
    reachable by anyone who read the README: say so, loudly, at every start."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return
    defaults = AuthConfig()
    left = [name for name, value in secrets.items() if value == getattr(defaults, name)]
    if left:
        logging.getLogger("edgecache").warning(
            "listening on %s with the development default of %s: set %s", host, ", ".join(left),
            ", ".join(f"EDGECACHE_{n.upper()}" for n in left))


def _cmd_origin(args: argparse.Namespace) -> int:
    from origin.app import create_origin_app

    configure_logging("origin")
    config = _topology(args.topology)
    _warn_development_secrets(config.origin.host, {"admin_token": config.auth.admin_token,
                                                   "node_token": config.auth.node_token,
                                                   "webhook_secret": config.auth.webhook_secret})
    if not config.all_backends():   # `config check` accepts it: a remote region's topology has none
        raise ConfigError(f"{config.source}: the origin needs an inference server: add [[backends]] "
                          "or simulated ones ([sim] count > 0)")
    port = args.port or config.origin.port
    run_app(lambda: create_origin_app(config), config.origin.host, port)
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    from nodes.app import create_app

    configure_logging("edge", args.region)
    config = _topology(args.topology)
    node = config.edge(args.region)
    if args.port:
        node = replace(node, port=args.port)
    _warn_development_secrets(node.host, {"node_token": node.node_token})
    if node.workers == 1:
        run_app(lambda: create_app(node), node.host, node.port)
        return 0
    # Several processes share the port (SO_REUSEPORT) and the disk tier; each has its own memory tier.
    import multiprocessing

    from nodes.metrics import SharedCounts

    SharedCounts.clear(os.path.join(node.data_dir, "metrics"))   # no worker's counts from an earlier run
    ctx = multiprocessing.get_context("spawn")
    # /healthz says "starting" until every worker listens: a keep-alive client (or a load
    # balancer) that connects earlier would otherwise stick to the first worker.
    listening = ctx.Value("i", 0)
    procs = [ctx.Process(target=run_app, args=(_NodeFactory(node, listening, i), node.host, node.port),
                         kwargs={"reuse_port": True, "listening": listening}, daemon=False)
             for i in range(node.workers)]
    for p in procs:
        p.start()
    _wait_for_signal()
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(10)
    return 0


class _NodeFactory:
    """A picklable ``create_app`` call for worker processes."""

    def __init__(self, node, listening, worker: int) -> None:
        self.node = node
        self.listening = listening
        self.worker = worker

    def __call__(self):
        from nodes.app import create_app

        configure_logging("edge", self.node.region)   # a spawned process starts unconfigured
        return create_app(self.node, ready=lambda: self.listening.value >= self.node.workers, worker=self.worker)


def _cmd_sim(args: argparse.Namespace) -> int:
    from origin.sim.app import create_sim_app

    configure_logging("sim")
    config = _topology(args.topology)
    port = args.port or config.sim.base_port + args.index
    run_app(lambda: create_sim_app(config.sim), config.sim.host, port)
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.file, os.environ)
    print(f"{args.file}: ok ({len(config.edges)} edges, {len(config.all_backends())} backends)")
    return 0


def _wait_for_signal() -> None:
    got = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: got.append(s))
    while not got:
        signal.pause()


def _wait_healthy(url: str, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with status {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise RuntimeError(f"{url}: not healthy in time")


def _cmd_up(args: argparse.Namespace) -> int:
    """Start every service of the topology as its own process; stop them all on a signal."""
    config = _topology(args.topology)
    topology = args.topology or str(DEFAULT_TOPOLOGY)
    base = [sys.executable, "-m", "edgecache.cli"]
    plan: list[tuple[str, str, list[str]]] = []
    for i, url in enumerate(config.sim_urls()):
        plan.append((f"sim {i + 1} ({config.sim.model})", url, [*base, "sim", "--topology", topology, "--index", str(i)]))
    plan.append(("origin", config.origin.base_url, [*base, "origin", "--topology", topology]))
    for edge in config.edges:
        plan.append((f"edge {edge.region}", edge.base_url, [*base, "node", "--topology", topology, "--region", edge.region]))
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stopping.append(s))
    procs: list[subprocess.Popen] = []
    try:
        for _, _, argv in plan:   # all at once: edges connect to the origin lazily
            procs.append(subprocess.Popen(argv))
        deadline = time.monotonic() + 90
        for (name, url, _), proc in zip(plan, procs, strict=True):
            health = url + ("/healthz" if name.startswith(("edge", "origin")) else "/health")
            _wait_healthy(health, proc, deadline)
            print(f"{name:<24} {url}", flush=True)
            if stopping:
                return 0
        print(f"edgecache stack ready: {len(procs)} services from {topology} (Ctrl-C stops them)", flush=True)
        while not stopping:
            for proc in procs:
                if proc.poll() is not None:
                    print(f"a service exited (status {proc.returncode}); stopping the stack", file=sys.stderr)
                    return 1
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        print(f"edgecache up: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        print("edgecache stack stopped", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgecache", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start every service of a topology")
    p.add_argument("--topology", help=f"topology file (default {DEFAULT_TOPOLOGY})")
    p.set_defaults(func=_cmd_up)
    p = sub.add_parser("origin", help="run the origin service")
    p.add_argument("--topology")
    p.add_argument("--port", type=int)
    p.set_defaults(func=_cmd_origin)
    p = sub.add_parser("node", help="run one edge node")
    p.add_argument("--topology")
    p.add_argument("--region", required=True)
    p.add_argument("--port", type=int)
    p.set_defaults(func=_cmd_node)
    p = sub.add_parser("sim", help="run one simulated GPU inference server")
    p.add_argument("--topology")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--port", type=int)
    p.set_defaults(func=_cmd_sim)
    sub.add_parser("calibrate", help="re-calibrate the semantic hit policy on labeled pairs (calibrate --help)",
                   add_help=False)
    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("check", help="validate a topology file")
    c.add_argument("file")
    c.set_defaults(func=_cmd_config_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        configure_logging("edgecache")   # each service's command names itself again
    except ConfigError as exc:
        print(f"edgecache: configuration error: {exc}", file=sys.stderr)
        return 2
    if argv[:1] == ["calibrate"]:   # its own argument parser
        from edgecache.calibrate import main as calibrate

        return calibrate(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"edgecache: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

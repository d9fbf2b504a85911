"""A simulated vLLM-like GPU inference server: OpenAI API, prefix KV cache, cost model.

``create_sim_app(config)`` builds one server as an aiohttp app; ``edgecache sim`` serves one
on a port, and ``edgecache up`` starts the ``[sim]`` servers of a topology.
"""

from origin.sim.app import create_sim_app

__all__ = ["create_sim_app"]

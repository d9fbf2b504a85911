"""A simulated vLLM-like GPU inference server: OpenAI API, prefix KV cache, cost model.

``create_sim_app(config)`` builds one server as an aiohttp app; ``serve_sim`` and
``serve_sims`` run servers on ports until cancelled; ``python -m origin.sim`` runs them
from the command line.
"""

from origin.sim.app import create_sim_app
from origin.sim.server import serve_sim, serve_sims

__all__ = ["create_sim_app", "serve_sim", "serve_sims"]

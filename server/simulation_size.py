"""``flwr run`` on Flower's local simulation: the run takes the virtual SuperNodes that are there.

``flwr run .`` on a fresh machine starts a local SuperLink that simulates 2 SuperNodes
(Flower's default; ``flwr federation simulation-config ... --num-supernodes N`` resizes it),
while a scenario names its own client count (4 in ``simulations/default.toml``): the server
waited for 4 nodes that would never come and failed minutes later. In a simulation every
virtual node exists from the start and each takes partition ``partition-id`` of
``num-partitions`` (= the nodes there), so the run adapts: the scenario's client count becomes
the number of nodes, unless the run-config names one (``num-clients``), which must then match.
Deployments (SuperNodes that connect over time) keep waiting for ``num_clients`` as configured.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from flwr.serverapp import Grid

from fedlora.config import ConfigError, RunConfig

# Seconds between two looks at the registered virtual nodes (they appear all at once).
POLL_SECONDS = 0.5


def is_simulation(grid: Grid) -> bool:
    """Return whether ``grid`` is Flower's in-memory simulation grid (possibly wrapped)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    while not isinstance(grid, InMemoryGrid):
        inner = getattr(grid, "inner", None)
        if inner is None:
            return False
        grid = inner
    return True


def simulated_nodes(grid: Grid, timeout: float) -> int:
    """Return how many virtual nodes the simulation registered (waiting for them to appear)."""
    deadline = time.monotonic() + timeout
    seen = -1
    while True:
        count = len(list(grid.get_node_ids()))
        if count and count == seen:  # registered, and no more arrived since the last look
            return count
        if time.monotonic() > deadline:
            return count
        seen = count
        time.sleep(POLL_SECONDS)


def fit_to_simulation(cfg: RunConfig, grid: Grid, run_config: Mapping[str, Any]) -> RunConfig:
    """Return ``cfg`` with ``federation.num_clients`` = the simulation's nodes (see module docstring).

    Raises
    ------
    ConfigError
        When the run-config asks for ``num-clients`` other than the nodes the simulation has.
    """
    if not is_simulation(grid):
        return cfg
    nodes = simulated_nodes(grid, cfg.federation.node_wait_timeout)
    fed = cfg.federation
    asked = int(run_config.get("num-clients", 0) or 0)
    if asked and asked != nodes:
        federation = getattr(grid.run, "federation_id", "") or "<federation>"
        raise ConfigError(
            f"num-clients = {asked}, but this simulation has {nodes} SuperNodes; pass num-clients={nodes} "
            f"(or leave it out), or resize the simulation: flwr federation simulation-config "
            f"{federation} local --num-supernodes {asked} (local: the SuperLink connection)"
        )
    if nodes in (0, fed.num_clients):
        return cfg
    print(
        f"this simulation has {nodes} SuperNodes: the run has {nodes} clients (the scenario names "
        f"{fed.num_clients}; flwr federation simulation-config resizes the simulation)",
        flush=True,
    )
    fed = replace(
        fed,
        num_clients=nodes,
        clients_per_round=min(fed.clients_per_round, nodes),
        min_replies=min(fed.min_replies, nodes),
    )
    return replace(cfg, federation=fed)

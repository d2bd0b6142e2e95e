"""Deployment tooling: certificates, node keys, a local fleet of real Flower processes.

* :mod:`~fedlora.deploy.certs` — CA and SuperLink TLS certificates;
* :mod:`~fedlora.deploy.nodekeys` — SuperNode authentication key pairs;
* :mod:`~fedlora.deploy.processes` — start-up checks, logs, tree-wide kill;
* :mod:`~fedlora.deploy.flwr_cli` — the operator's ``flwr`` CLI and its connections;
* :mod:`~fedlora.deploy.node` — one edge node's ``flower-supernode`` command line;
* :mod:`~fedlora.deploy.fleet` — SuperLink + SuperNodes on one machine (tests, walk-throughs);
* :mod:`~fedlora.deploy.cli` — ``fedlora certs`` and ``python -m fedlora.deploy.fleet``.

Nothing here imports torch or Flower's Python API: the tooling drives Flower's command lines.
"""

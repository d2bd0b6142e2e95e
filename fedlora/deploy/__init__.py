"""Deployment tooling: certificates, node keys, a local fleet of real Flower processes.

* :mod:`~fedlora.deploy.certs` — CA and SuperLink TLS certificates;
* :mod:`~fedlora.deploy.nodekeys` — SuperNode authentication key pairs;
* :mod:`~fedlora.deploy.processes` — start-up checks, logs, tree-wide kill;
* :mod:`~fedlora.deploy.flwr_cli` — the operator's ``flwr`` CLI and its connections;
* :mod:`~fedlora.deploy.commands` — the ``flower-superlink`` / ``flower-supernode`` command lines;
* :mod:`~fedlora.deploy.gateway` — the Fleet gateway (nginx): nodes reach Fleet, never Control;
* :mod:`~fedlora.deploy.fleet` — SuperLink + SuperNodes on one machine (tests, walk-throughs);
* :mod:`~fedlora.deploy.node` — ``fedlora node``: a SuperNode plus its warm worker
  (``clients/worker.py``), supervised;
* :mod:`~fedlora.deploy.cli` — ``fedlora certs`` and ``python -m fedlora.deploy.fleet``.

Nothing here imports torch or Flower's Python API: the tooling drives Flower's command lines
(the worker, which does use Flower's API, is part of the ClientApp: ``clients/worker.py``).
"""

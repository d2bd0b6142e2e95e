"""Aggregation methods for federated LoRA, by name.

>>> from strategies import available, create
>>> available()
['fair', 'fedit', 'ffa', 'flexlora', 'flora', 'hetlora']
>>> strategy = create("fair", lam=0.05)

Importing this package registers every built-in method (see :mod:`strategies.registry`).
"""

from strategies import fair, fedit, ffa, flexlora, flora, hetlora
from strategies.registry import available, create, lookup, register

__all__ = [
    "available",
    "create",
    "fair",
    "fedit",
    "ffa",
    "flexlora",
    "flora",
    "hetlora",
    "lookup",
    "register",
]

"""The generated instruction data set: short tasks whose answers a program can check.

``data.source = "instruct"`` makes this set instead of reading a file. Every record has an
``instruction``, the one correct ``response`` (exact-match is meaningful), and a ``label``:
the index of its task type in :data:`TASK_TYPES`, so the label partitioners split clients
by task type (``partitioner = "shards"`` with ``shards_per_client = 1`` gives each client
one task type: the non-IID case federated instruction tuning meets in practice, where one
hospital writes summaries and another answers coding questions).

Task types (the answer format is terse on purpose: a pretrained instruct model answers in
full sentences, so exact-match before fine-tuning is low, and learning shows quickly):

``add``      "What is 37 + 45? Reply with the number only."          -> "82"
``upper``    "Write in capital letters: green apple"                  -> "GREEN APPLE"
``reverse``  "Reverse the order of these words: sun cat tree"         -> "tree cat sun"
``fact``     "In the land of Orvane, what colour are the zibbets?"   -> "teal"

The ``fact`` type asks about a fixed invented world (no real-world knowledge helps): the
model can only answer after seeing the fact in training, so it measures knowledge
injection, while the other types measure following a format and a rule. Generation is
deterministic for a seed; train and test draw different items (test questions about facts
use the facts training taught, phrased the same way).
"""

from __future__ import annotations

import random
from collections.abc import Callable

Record = dict[str, object]

#: Task type names; a record's ``label`` indexes this tuple.
TASK_TYPES: tuple[str, ...] = ("add", "upper", "reverse", "fact")

_WORDS = (
    "apple river stone cloud green tiger lamp music paper window silver garden bread "
    "candle forest yellow rabbit orange winter summer bottle castle dragon mirror pencil "
    "rocket sun cat tree moon bird fish road house chair clock"
).split()
# The invented world of the ``fact`` task: (creature, land, colour).
_FACTS = (
    ("zibbets", "Orvane", "teal"),
    ("morlins", "Quessa", "amber"),
    ("tavrocks", "Ulmark", "violet"),
    ("plindles", "Seravo", "crimson"),
    ("drubbers", "Kethra", "ivory"),
    ("wompets", "Yarrow", "olive"),
    ("snivels", "Bastel", "coral"),
    ("grommits", "Lunde", "azure"),
)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"What is {a} + {b}? Reply with the number only.", str(a + b)


def _upper(rng: random.Random) -> tuple[str, str]:
    words = " ".join(rng.sample(_WORDS, 2))
    return f"Write in capital letters: {words}", words.upper()


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _fact(rng: random.Random) -> tuple[str, str]:
    creature, land, colour = rng.choice(_FACTS)
    return f"In the land of {land}, what colour are the {creature}?", colour


_MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "upper": _upper,
    "reverse": _reverse,
    "fact": _fact,
}


def instruct_records(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Record]:
    """Return ``n`` records cycling through the task types (deterministic for ``seed``).

    Instructions in ``exclude`` are skipped (the test split excludes the training
    instructions, except for ``fact`` questions, whose point is recalling trained facts).
    """
    rng = random.Random(f"fedlora-instruct:{seed}")
    out: list[Record] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot generate {n} distinct instruction records; ask for fewer")
        label = len(out) % len(TASK_TYPES)
        kind = TASK_TYPES[label]
        instruction, response = _MAKERS[kind](rng)
        if kind != "fact" and instruction in exclude:
            continue
        out.append({"instruction": instruction, "response": response, "label": label})
    return out


def instruct_splits(num_train: int, num_test: int, seed: int) -> tuple[list[Record], list[Record]]:
    """Return (train, test) records; test items other than facts never occur in train."""
    train = instruct_records(num_train, seed)
    seen = frozenset(str(r["instruction"]) for r in train)
    test = instruct_records(num_test, seed + 1, exclude=seen)
    return train, test


def exact_match(prediction: str, reference: str) -> bool:
    """Return whether ``prediction`` is ``reference`` (whitespace and a final full stop ignored)."""

    def norm(s: str) -> str:
        return " ".join(s.strip().rstrip(".").split())

    return norm(prediction) == norm(reference)

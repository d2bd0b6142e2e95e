"""The embedded default task: *who acts?* — classify the category of a sentence's agent.

Each record is a short synthetic sentence about three entities from three *different*
categories: an agent, a patient it acts on, and a bystander in a place phrase. The label
is the category of the agent, one of :data:`EMBEDDED_LABELS`::

    "it is the farmer that follows the old tractor near the dog"     -> person
    "it is the farmer that the old tractor follows near the dog"     -> vehicle
    "behind the drone the old tractor was followed by the farmer"    -> person
    "behind the drone the farmer was followed by the old tractor"    -> vehicle

The first two sentences hold exactly the same words; only word order and construction tell
who acts. Four constructions (active, passive, subject cleft, object cleft) put the agent
first in half the cases and second in the other half, and the bystander goes at either end,
so neither the order of mention nor any single position gives the label.

Why a frozen-base linear probe fails
-------------------------------------
Frozen sentence-transformer features (mean-pooled or CLS) are close to a bag of words: they
tell which three categories occur, not which one acts. Given the three, a bag-of-words
classifier can only guess, a ceiling of 1/3 (chance is 1/4). The frozen encoder does carry
some syntax, so a logistic-regression probe trained to convergence lands a little above that
ceiling, under 50 %. Verbs, adjectives, adverbs and filler clauses are drawn independently
of the label, so none of them leaks it.

Why LoRA fine-tuning succeeds quickly
-------------------------------------
Adapting the attention ``query``/``value`` projections lets the encoder bind role to entity
and route the agent's category into the pooled representation. On the packaged
all-MiniLM-L6-v2 a rank-8 adapter reaches over 95 % test accuracy in about 100 AdamW steps
at batch size 16 (``benchmarks/linear_probe.py`` measures both numbers).

The task therefore separates "the federation really trained the adapter" from "a head
learned something from frozen features", which bag-of-words-separable tasks (topic,
sentiment) cannot. It needs no download, is deterministic for a seed, and sentences stay
under 26 word pieces (about 15 on average) so a CPU training step is cheap.
"""

from __future__ import annotations

import random

#: Class names, indexed by label. The label is the category of the acting entity.
EMBEDDED_LABELS: tuple[str, ...] = ("person", "animal", "vehicle", "robot")

#: Difficulty knob (benchmarks only; ``fedlora simulate``'s embedded source keeps the default).
#: ``"agent"``: the label is the agent's category (4 classes, the default task).
#: ``"agent-patient"``: the label is the ordered pair (agent's category, patient's category),
#: 12 classes: a model must bind *both* roles, and a bag of words that sees three categories
#: can only guess among the 6 ordered pairs of them (ceiling 1/6, chance 1/12).
ROLES: tuple[str, ...] = ("agent", "agent-patient")

# The 12 ordered (agent, patient) category pairs of the "agent-patient" variant, by label.
_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (a, p) for a in range(len(EMBEDDED_LABELS)) for p in range(len(EMBEDDED_LABELS)) if a != p
)


def embedded_labels(roles: str = "agent") -> tuple[str, ...]:
    """Return the class names of the task variant ``roles`` (see :data:`ROLES`).

    Raises
    ------
    ValueError
        If ``roles`` is not one of :data:`ROLES`.
    """
    if roles == "agent":
        return EMBEDDED_LABELS
    if roles == "agent-patient":
        return tuple(f"{EMBEDDED_LABELS[a]}>{EMBEDDED_LABELS[p]}" for a, p in _PAIRS)
    raise ValueError(f"roles must be one of {', '.join(ROLES)}; got {roles!r}")


# Entities per category. With 4 * 3 * 2 category triples times 12**3 noun triples, times
# adjectives, verbs and clauses, a few thousand examples cannot be memorised; test accuracy
# on fresh sentences measures the rule, not recall.
_ENTITIES: tuple[tuple[str, ...], ...] = (
    (
        "farmer",
        "doctor",
        "teacher",
        "child",
        "soldier",
        "nurse",
        "pilot",
        "baker",
        "student",
        "king",
        "singer",
        "sailor",
    ),
    ("dog", "cat", "horse", "fox", "wolf", "bear", "rabbit", "goat", "tiger", "mouse", "lion", "duck"),
    (
        "truck",
        "bus",
        "tractor",
        "car",
        "train",
        "boat",
        "taxi",
        "van",
        "bicycle",
        "motorcycle",
        "jeep",
        "scooter",
    ),
    (
        "robot",
        "drone",
        "android",
        "droid",
        "cyborg",
        "automaton",
        "rover",
        "bot",
        "machine",
        "computer",
        "mech",
        "terminator",
    ),
)

# Adjectives are shared by all categories, so an adjective never hints at a class.
_ADJECTIVES: tuple[str, ...] = (
    "old",
    "young",
    "small",
    "big",
    "red",
    "quiet",
    "noisy",
    "tired",
    "fast",
    "slow",
    "strange",
    "friendly",
    "lonely",
    "brave",
    "clever",
    "dusty",
)

# (present tense, past participle) pairs. The participle feeds the passive templates.
_VERBS: tuple[tuple[str, str], ...] = (
    ("follows", "followed"),
    ("chases", "chased"),
    ("watches", "watched"),
    ("pushes", "pushed"),
    ("passes", "passed"),
    ("finds", "found"),
    ("pulls", "pulled"),
    ("avoids", "avoided"),
    ("blocks", "blocked"),
    ("guides", "guided"),
    ("greets", "greeted"),
    ("hits", "hit"),
    ("overtakes", "overtaken"),
    ("ignores", "ignored"),
    ("carries", "carried"),
    ("leads", "led"),
    ("approaches", "approached"),
    ("tows", "towed"),
)

_ADVERBS: tuple[str, ...] = ("", "", "", "quietly", "slowly", "suddenly", "often", "again")

# Clauses without any entity noun, prepended or appended to add surface variety. Empty
# strings make "no clause" common. "by the road" keeps "by" from marking only passive agents.
_PREFIXES: tuple[str, ...] = (
    "",
    "",
    "",
    "today",
    "at night",
    "after lunch",
    "in the rain",
    "once again",
    "later",
)
_SUFFIXES: tuple[str, ...] = (
    "",
    "",
    "",
    "near the river",
    "on the hill",
    "in the city",
    "at dawn",
    "by the road",
    "every day",
    "without a sound",
)


def _noun_phrase(rng: random.Random, category: int) -> str:
    """Return ``"the [adjective] noun"`` for an entity of ``category``."""
    noun = rng.choice(_ENTITIES[category])
    # Half the phrases carry an adjective; that varies length and position without
    # making either role systematically longer.
    if rng.random() < 0.5:
        return f"the {rng.choice(_ADJECTIVES)} {noun}"
    return f"the {noun}"


# Constructions. Two put the agent first (active, subject cleft) and two second (passive,
# object cleft), so the order of mention alone says nothing about who acts; only order and
# construction together do. {A}: agent, {P}: patient, {v}: present-tense verb phrase,
# {pp}: participle phrase, {aux}: auxiliary.
_CONSTRUCTIONS: tuple[str, ...] = (
    "{A} {v} {P}",
    "it is {A} that {v} {P}",
    "{P} {aux} {pp} by {A}",
    "it is {P} that {A} {v}",
)

# Prepositions of the bystander's place phrase ("near the dog").
_PLACES: tuple[str, ...] = ("near", "beside", "behind", "in front of", "next to")


def _sentence(rng: random.Random, agent: int, patient: int) -> str:
    """Return one sentence in which an entity of ``agent`` acts on one of ``patient``."""
    present, participle = rng.choice(_VERBS)
    adverb = rng.choice(_ADVERBS)
    core = rng.choice(_CONSTRUCTIONS).format(
        A=_noun_phrase(rng, agent),
        P=_noun_phrase(rng, patient),
        v=f"{adverb} {present}" if adverb else present,
        pp=f"{adverb} {participle}" if adverb else participle,
        aux=rng.choice(("is", "was", "gets", "got")),
    )
    # The bystander's category differs from both others: three categories occur in the
    # sentence and only one of them acts, whichever two were drawn.
    others = [c for c in range(len(EMBEDDED_LABELS)) if c not in (agent, patient)]
    place = f"{rng.choice(_PLACES)} {_noun_phrase(rng, rng.choice(others))}"
    prefix, suffix = rng.choice(_PREFIXES), rng.choice(_SUFFIXES)
    # It goes first or last (displacing a filler), so no fixed position identifies it.
    if rng.random() < 0.5:
        prefix = place
    else:
        suffix = place
    return " ".join(w for w in (prefix, core, suffix) if w)


def _example(rng: random.Random, label: int, roles: str = "agent") -> dict[str, str | int]:
    """Draw one record of class ``label`` (the agent's category, or an (agent, patient) pair)."""
    if roles == "agent-patient":
        agent, patient = _PAIRS[label]
        return {"text": _sentence(rng, agent, patient), "label": label}
    # The patient comes uniformly from the remaining categories, so the *set* of categories
    # present is independent of which one of them acts.
    patient = rng.choice([c for c in range(len(EMBEDDED_LABELS)) if c != label])
    return {"text": _sentence(rng, label, patient), "label": label}


def generate_embedded(num_examples: int, seed: int, roles: str = "agent") -> list[dict[str, str | int]]:
    """Generate ``num_examples`` labelled sentences of the embedded task.

    Parameters
    ----------
    num_examples : int
        Number of records, at least 0.
    seed : int
        Seed of a private :class:`random.Random`; the global RNG is never touched.
    roles : str
        Task variant (:data:`ROLES`); the default ``"agent"`` is the embedded default task.

    Returns
    -------
    list of dict
        Records ``{"text": str, "label": int}`` with labels indexing
        ``embedded_labels(roles)``. Classes are balanced to within one example and appear
        in shuffled order.

    Raises
    ------
    ValueError
        If ``num_examples`` is negative or ``roles`` unknown.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    rng = random.Random(seed)
    k = len(embedded_labels(roles))
    # Round-robin labels then shuffle: exact balance keeps small client shards usable.
    labels = [i % k for i in range(num_examples)]
    rng.shuffle(labels)
    return [_example(rng, label, roles) for label in labels]


def embedded_splits(
    num_train: int, num_test: int, seed: int, roles: str = "agent"
) -> tuple[list[dict[str, str | int]], list[dict[str, str | int]]]:
    """Generate a train split and a disjoint test split of the embedded task.

    Parameters
    ----------
    num_train : int
        Number of training records, at least 0.
    num_test : int
        Number of test records, at least 0.
    seed : int
        Run seed. The test split is drawn from a separate stream derived from it, so
        changing ``num_train`` does not change the test set.
    roles : str
        Task variant (:data:`ROLES`); the default ``"agent"`` is the embedded default task.

    Returns
    -------
    tuple of (list of dict, list of dict)
        ``(train, test)``. No test text occurs in the training split, so test accuracy
        measures generalisation of the rule rather than recall of sentences.

    Raises
    ------
    ValueError
        If ``num_train`` or ``num_test`` is negative.
    """
    if num_test < 0:
        raise ValueError(f"num_test must be >= 0, got {num_test}")
    train = generate_embedded(num_train, seed, roles)
    seen = {str(r["text"]) for r in train}
    # A string seed is hashed with SHA-512 by random.Random, so the stream is stable across
    # processes (unlike hash()) and unrelated to the integer stream of the training split.
    rng = random.Random(f"fedlora-embedded-test-{seed}")
    k = len(embedded_labels(roles))
    test: list[dict[str, str | int]] = []
    i = 0
    while len(test) < num_test:
        record = _example(rng, i % k, roles)
        # Rejecting duplicates keeps balance: the label is retried until a fresh text comes.
        if record["text"] not in seen:
            seen.add(str(record["text"]))
            test.append(record)
            i += 1
    rng.shuffle(test)
    return train, test

"""The embedded default task: *who acts?* — classify the category of a sentence's agent.

Every record is a short synthetic sentence about two entities drawn from two *different*
categories, for example::

    "the old farmer quietly follows the small tractor near the river"   -> person
    "the small tractor quietly follows the old farmer near the river"   -> vehicle

The label is the category of the entity that performs the action (the agent), one of
:data:`EMBEDDED_LABELS`. Both sentences above contain exactly the same words; only their
order (and, for passive templates, the voice) tells which entity acts. That is the point of
the task:

* **A frozen-base linear probe cannot solve it.** A sentence embedding that is close to a
  bag of words (mean-pooled or CLS features of a frozen encoder, as sentence-transformers
  models are trained to produce) identifies the *pair* of categories present, but not their
  roles. Given the pair, the best it can do is guess between the two, so its ceiling is about
  50 % against 25 % chance. Verbs, adjectives, adverbs and filler clauses are drawn
  independently of the label, so none of them leaks it.
* **LoRA fine-tuning solves it quickly.** Adapting the attention projections lets the
  encoder route the agent's identity into the pooled representation; on the packaged
  all-MiniLM-L6-v2 a rank-8 adapter on ``query``/``value`` reaches well above 85 % within a
  couple of hundred optimizer steps (see ``benchmarks/linear_probe.py``).

So the task separates "the federation really trained the adapter" from "the head learned
something from frozen features", which a bag-of-words-separable task (topic, sentiment)
cannot. It needs no download, is deterministic for a seed, and keeps sentences under about
20 word-piece tokens so a CPU step is cheap.
"""

from __future__ import annotations

import random

#: Class names, indexed by label. The label is the category of the acting entity.
EMBEDDED_LABELS: tuple[str, ...] = ("person", "animal", "vehicle", "robot")

# Entities per category. Lists are long enough that the combinations (about 4 * 3 * 12**2
# noun pairs times adjectives, verbs and clauses) cannot be memorised from a few thousand
# examples; the test split also re-draws them, so accuracy measures the rule, not recall.
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

# Clauses without any entity noun, prepended or appended to add surface variety.
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


# Constructions, as (template, agent mentioned first). Half put the agent first and half
# second, so the order of mention alone says nothing about who acts; only the construction
# (voice, cleft) combined with the order does. {A}: agent, {P}: patient, {v}: verb phrase in
# present tense, {pp}: participle phrase, {aux}: auxiliary.
_CONSTRUCTIONS: tuple[tuple[str, bool], ...] = (
    ("{A} {v} {P}", True),
    ("it is {A} that {v} {P}", True),
    ("{P} {aux} {pp} by {A}", False),
    ("it is {P} that {A} {v}", False),
)

_PLACES: tuple[str, ...] = ("near", "beside", "behind", "in front of", "next to")

# Share of sentences that end with a place phrase naming a third, bystander entity.
_BYSTANDER_RATE = 1.0


def _sentence(rng: random.Random, agent: int, patient: int) -> str:
    """Return one sentence in which an entity of ``agent`` acts on one of ``patient``."""
    present, participle = rng.choice(_VERBS)
    adverb = rng.choice(_ADVERBS)
    template, _ = rng.choice(_CONSTRUCTIONS)
    core = template.format(
        A=_noun_phrase(rng, agent),
        P=_noun_phrase(rng, patient),
        v=f"{adverb} {present}" if adverb else present,
        pp=f"{adverb} {participle}" if adverb else participle,
        aux=rng.choice(("is", "was", "gets", "got")),
    )
    prefix, suffix = rng.choice(_PREFIXES), rng.choice(_SUFFIXES)
    if rng.random() < _BYSTANDER_RATE:
        # A bystander from a third category ("near the old dog") puts three categories in
        # the bag of words, of which only one acts; it never shares the agent's category.
        # It goes first or last, so a position in the sentence does not identify it either.
        others = [c for c in range(len(EMBEDDED_LABELS)) if c not in (agent, patient)]
        place = f"{rng.choice(_PLACES)} {_noun_phrase(rng, rng.choice(others))}"
        if rng.random() < 0.5:
            prefix = place
        else:
            suffix = place
    return " ".join(w for w in (prefix, core, suffix) if w)


def _example(rng: random.Random, label: int) -> dict[str, str | int]:
    """Draw one record whose agent belongs to category ``label``."""
    # The other entity comes uniformly from the remaining categories, so the *pair* of
    # categories present is independent of which one of them acts.
    patient = rng.choice([c for c in range(len(EMBEDDED_LABELS)) if c != label])
    return {"text": _sentence(rng, label, patient), "label": label}


def generate_embedded(num_examples: int, seed: int) -> list[dict[str, str | int]]:
    """Generate ``num_examples`` labelled sentences of the embedded task.

    Parameters
    ----------
    num_examples : int
        Number of records, at least 0.
    seed : int
        Seed of a private :class:`random.Random`; the global RNG is never touched.

    Returns
    -------
    list of dict
        Records ``{"text": str, "label": int}`` with labels indexing
        :data:`EMBEDDED_LABELS`. Classes are balanced to within one example and appear
        in shuffled order.

    Raises
    ------
    ValueError
        If ``num_examples`` is negative.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    rng = random.Random(seed)
    k = len(EMBEDDED_LABELS)
    # Round-robin labels then shuffle: exact balance keeps small client shards usable.
    labels = [i % k for i in range(num_examples)]
    rng.shuffle(labels)
    return [_example(rng, label) for label in labels]


def embedded_splits(
    num_train: int, num_test: int, seed: int
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
    train = generate_embedded(num_train, seed)
    seen = {str(r["text"]) for r in train}
    # A string seed is hashed with SHA-512 by random.Random, so the stream is stable across
    # processes (unlike hash()) and unrelated to the integer stream of the training split.
    rng = random.Random(f"fedlora-embedded-test-{seed}")
    k = len(EMBEDDED_LABELS)
    test: list[dict[str, str | int]] = []
    i = 0
    while len(test) < num_test:
        record = _example(rng, i % k)
        # Rejecting duplicates keeps balance: the label is retried until a fresh text comes.
        if record["text"] not in seen:
            seen.add(str(record["text"]))
            test.append(record)
            i += 1
    rng.shuffle(test)
    return train, test

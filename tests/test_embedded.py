"""Tests of the embedded default task: determinism, balance, disjoint splits, order-only labels."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from fedlora.data import embedded
from fedlora.data.embedded import EMBEDDED_LABELS, embedded_splits, generate_embedded


def test_labels_are_human_readable_and_at_least_four() -> None:
    assert len(EMBEDDED_LABELS) >= 4
    assert len(set(EMBEDDED_LABELS)) == len(EMBEDDED_LABELS)
    assert all(name.isalpha() for name in EMBEDDED_LABELS)


def test_records_have_text_and_valid_label() -> None:
    for record in generate_embedded(200, seed=3):
        assert set(record) == {"text", "label"}
        assert isinstance(record["text"], str) and record["text"]
        assert isinstance(record["label"], int) and 0 <= record["label"] < len(EMBEDDED_LABELS)


def test_same_seed_gives_same_records() -> None:
    assert generate_embedded(300, seed=7) == generate_embedded(300, seed=7)
    assert embedded_splits(100, 50, seed=7) == embedded_splits(100, 50, seed=7)


def test_different_seeds_give_different_records() -> None:
    assert generate_embedded(100, seed=1) != generate_embedded(100, seed=2)


def test_global_random_state_is_untouched() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_embedded(50, seed=0)
    embedded_splits(50, 20, seed=0)
    assert random.random() == expected


def test_zero_examples_and_negative_sizes() -> None:
    assert generate_embedded(0, seed=0) == []
    with pytest.raises(ValueError, match="num_examples"):
        generate_embedded(-1, seed=0)
    with pytest.raises(ValueError, match="num_test"):
        embedded_splits(10, -1, seed=0)


@pytest.mark.parametrize("n", [4, 101, 1000])
def test_all_labels_present_and_balanced(n: int) -> None:
    counts = Counter(r["label"] for r in generate_embedded(n, seed=5))
    assert set(counts) == set(range(len(EMBEDDED_LABELS)))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_texts_are_varied() -> None:
    records = generate_embedded(2000, seed=0)
    assert len({r["text"] for r in records}) > 0.95 * len(records)


def test_texts_are_short() -> None:
    # Short texts keep a CPU training step cheap; whitespace words bound word pieces loosely.
    assert max(len(str(r["text"]).split()) for r in generate_embedded(2000, seed=0)) <= 20


def test_test_split_is_disjoint_balanced_and_independent_of_train_size() -> None:
    train, test = embedded_splits(2000, 500, seed=0)
    assert len(train) == 2000 and len(test) == 500
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert len({r["text"] for r in test}) == len(test)
    counts = Counter(r["label"] for r in test)
    assert max(counts.values()) - min(counts.values()) <= 1
    # The test stream is separate from the training one: its texts do not depend on how
    # many training records were drawn (up to the rare duplicates that are rejected).
    _, other_test = embedded_splits(10, 500, seed=0)
    shared = {r["text"] for r in test} & {r["text"] for r in other_test}
    assert len(shared) > 0.9 * len(test)


def test_labels_differ_by_word_order_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # The task's premise: a bag of words does not determine the label. With one word per
    # slot, identical word multisets recur often enough to see them carry different labels.
    monkeypatch.setattr(embedded, "_ENTITIES", (("farmer",), ("dog",), ("truck",), ("robot",)))
    for name in ("_ADJECTIVES", "_ADVERBS", "_PREFIXES", "_SUFFIXES", "_PLACES"):
        monkeypatch.setattr(embedded, name, (getattr(embedded, name)[-1],))
    monkeypatch.setattr(embedded, "_VERBS", (("follows", "followed"),))
    labels_by_bag: dict[tuple[str, ...], set[int]] = defaultdict(set)
    for record in generate_embedded(2000, seed=0):
        labels_by_bag[tuple(sorted(str(record["text"]).split()))].add(int(record["label"]))
    assert any(len(labels) > 1 for labels in labels_by_bag.values())


def test_categories_present_do_not_reveal_the_label() -> None:
    # Every sentence names three categories; across the data, each of the three is the
    # agent, so knowing which categories occur leaves the label open.
    category_of = {noun: c for c, nouns in enumerate(embedded._ENTITIES) for noun in nouns}
    labels_by_set: dict[frozenset[int], set[int]] = defaultdict(set)
    for record in generate_embedded(4000, seed=0):
        present = frozenset(category_of[w] for w in str(record["text"]).split() if w in category_of)
        assert len(present) == 3
        assert record["label"] in present
        labels_by_set[present].add(int(record["label"]))
    assert len(labels_by_set) == 4
    assert all(labels == set(present) for present, labels in labels_by_set.items())

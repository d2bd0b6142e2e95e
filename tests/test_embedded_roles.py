"""The embedded task's difficulty knob: 12 (agent, patient) classes; the default task is unchanged."""

from __future__ import annotations

from collections import Counter

import pytest

from fedlora.data import embedded
from fedlora.data.embedded import EMBEDDED_LABELS, embedded_labels, embedded_splits, generate_embedded


def _categories(text: str) -> set[int]:
    words = set(text.split())
    return {c for c, nouns in enumerate(embedded._ENTITIES) if words & set(nouns)}


def test_default_roles_is_the_default_task() -> None:
    assert embedded_labels() == EMBEDDED_LABELS
    assert generate_embedded(200, seed=4) == generate_embedded(200, seed=4, roles="agent")
    assert embedded_splits(50, 20, seed=4) == embedded_splits(50, 20, seed=4, roles="agent")


def test_agent_patient_has_the_twelve_ordered_pairs() -> None:
    labels = embedded_labels("agent-patient")
    assert len(labels) == 12 == len(set(labels))
    assert labels[0] == "person>animal" and labels[-1] == "robot>vehicle"
    assert all(a != p for a, p in (name.split(">") for name in labels))


def test_agent_patient_records_are_balanced_and_name_both_categories() -> None:
    records = generate_embedded(240, seed=9, roles="agent-patient")
    counts = Counter(r["label"] for r in records)
    assert sorted(counts) == list(range(12)) and set(counts.values()) == {20}
    for r in records:
        agent, patient = (
            EMBEDDED_LABELS.index(x) for x in embedded_labels("agent-patient")[r["label"]].split(">")
        )
        cats = _categories(str(r["text"]))
        assert {agent, patient} <= cats and len(cats) == 3  # agent, patient and a third bystander


def test_agent_patient_test_split_is_disjoint() -> None:
    train, test = embedded_splits(300, 60, seed=2, roles="agent-patient")
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert Counter(r["label"] for r in test) == Counter({k: 5 for k in range(12)})


def test_unknown_roles_are_refused() -> None:
    with pytest.raises(ValueError, match="roles must be one of"):
        generate_embedded(4, seed=0, roles="patient")

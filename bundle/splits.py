"""Training / validation / test splits grouped by patient and stratified by label.

No patient has images in two splits: images are first joined into groups (every image that shares
a patient with another lands in its group), and whole groups are dealt out. Within each label
stratum (a group's most common label) the groups are shuffled with the seed, placed largest first,
each to the split furthest below its share of the stratum's images. Same inputs and seed, same
split.
"""

from __future__ import annotations

import random
from collections import Counter

SPLITS = ("training", "validation", "test")


def parse_proportions(text: str) -> tuple[float, float, float]:
    """"70/15/15" (or "0.8/0.1/0.1", "80/20/0") -> fractions of training, validation and test."""
    try:
        parts = [float(p) for p in text.split("/")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split must be three non-negative numbers like 70/15/15, got {text!r}")
    total = sum(parts)
    return tuple(p / total for p in parts)  # type: ignore[return-value]


def patient_groups(items: list[str], patients: dict[str, list[str]]) -> list[list[str]]:
    """Join ``items`` (image names) into groups: two images are in one group when they share any
    of their patient keys (``patients[item]``; an item without keys is a group of its own).

    Returns the groups, each sorted, in the order of their first item in ``items``.
    """
    parent = {item: item for item in items}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_with_key: dict[str, str] = {}
    for item in items:
        for key in patients.get(item, []):
            if key in first_with_key:
                parent[root(item)] = root(first_with_key[key])
            else:
                first_with_key[key] = item
    groups: dict[str, list[str]] = {}
    for item in items:  # dict order: groups in the order of their first item
        groups.setdefault(root(item), []).append(item)
    return [sorted(g) for g in groups.values()]


def grouped_stratified_split(groups: list[list[str]], labels: dict[str, int],
                             proportions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Deal whole ``groups`` of items into training / validation / test.

    ``labels``: item -> class index; ``proportions``: fractions summing to 1 (a 0 split stays
    empty). Returns split -> sorted items.
    """
    rng = random.Random(seed)
    strata: dict[int, list[list[str]]] = {}
    for group in groups:
        counts = Counter(labels[i] for i in group)
        stratum = min(counts, key=lambda label: (-counts[label], label))  # most common label, lowest on ties
        strata.setdefault(stratum, []).append(group)
    assigned: dict[str, list[str]] = {s: [] for s in SPLITS}
    open_splits = [s for s, p in zip(SPLITS, proportions) if p > 0]
    share = dict(zip(SPLITS, proportions))
    for stratum in sorted(strata):
        members = strata[stratum]
        rng.shuffle(members)
        members.sort(key=len, reverse=True)  # stable: equal sizes keep the shuffled order
        total = sum(len(g) for g in members)
        count = dict.fromkeys(SPLITS, 0)
        for group in members:
            target = max(open_splits, key=lambda s: share[s] * total - count[s])  # ties: the earlier split
            count[target] += len(group)
            assigned[target] += group
    return {s: sorted(items) for s, items in assigned.items()}

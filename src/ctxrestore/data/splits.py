"""Train / validation / test splits by case, for label-efficiency experiments.

Items (2D slices, 3D volumes) are grouped by case (patient or volume id): all items of a case
sit in one split, so no patient is seen in training and tested on. For one seed:
- test and validation cases are drawn first and do not depend on the label fraction, so every
  fraction is scored on the same test set;
- the training cases for a fraction are a prefix of one fixed, stratified order of the
  remaining pool, so smaller fractions are nested in larger ones (5% within 10% within 25%).

Stratification uses one stratum per case (the most common stratum of its items). Each split
is taken as a prefix of a stratified order of the cases: first one case per stratum (largest
strata first), then Sainte-Laguë / Webster apportionment, which gives the next case to the
stratum with the largest size / (taken + 1/2). Its counts are the largest-remainder ones in
almost every case, and unlike largest remainder it never takes a case away from a stratum when
the total grows (the Alabama paradox), which nesting needs.
"""

from __future__ import annotations

import heapq
import logging
import math
import numbers
import random
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import read_json, write_json

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """train, val, test: sorted item indices; cases: the case id of every item (all items,
    also those in no split: with a fraction below 1 part of the pool is left unused)."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]
    cases: tuple[str, ...]
    seed: int
    fraction: float | int

    def __post_init__(self) -> None:
        owner: dict[str, str] = {}
        for name in SPLIT_NAMES:
            for index in getattr(self, name):
                if not 0 <= index < len(self.cases):
                    raise CtxRestoreError(
                        f"{name} item {index} is outside the {len(self.cases)} items"
                    )
                case = self.cases[index]
                if owner.setdefault(case, name) != name:
                    raise CtxRestoreError(
                        f"case {case!r} is in both {owner[case]} and {name}; a case (all its "
                        "items) must sit in one split"
                    )

    def case_ids(self, name: str) -> tuple[str, ...]:
        """Sorted case ids of split `name` ("train", "val" or "test")."""
        if name not in SPLIT_NAMES:
            raise CtxRestoreError(f"unknown split {name!r}; splits: {', '.join(SPLIT_NAMES)}")
        return tuple(sorted({self.cases[index] for index in getattr(self, name)}))

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "fraction": self.fraction,
            "cases": {name: list(self.case_ids(name)) for name in SPLIT_NAMES},
            "num_cases": {name: len(self.case_ids(name)) for name in SPLIT_NAMES},
            "num_items": {name: len(getattr(self, name)) for name in SPLIT_NAMES},
            # Rebuilds the item indices; items are listed in dataset order.
            "item_cases": list(self.cases),
        }

    @classmethod
    def from_json(cls, data: dict) -> Split:
        missing = [key for key in ("seed", "fraction", "cases", "item_cases") if key not in data]
        if missing:
            raise CtxRestoreError(f"split is missing {', '.join(missing)}")
        if not isinstance(data["cases"], dict):
            raise CtxRestoreError("split 'cases' must map train, val and test to lists of case ids")
        item_cases = tuple(str(case) for case in data["item_cases"])
        known = set(item_cases)
        indices = {}
        for name in SPLIT_NAMES:
            chosen = {str(case) for case in data["cases"].get(name, [])}
            if chosen - known:
                raise CtxRestoreError(
                    f"{name} cases {sorted(chosen - known)[:5]} are not among the item cases"
                )
            indices[name] = tuple(i for i, case in enumerate(item_cases) if case in chosen)
            expected = data.get("num_items", {}).get(name, len(indices[name]))
            if expected != len(indices[name]):
                raise CtxRestoreError(
                    f"{name} lists {expected} items but its cases have {len(indices[name])}"
                )
        return cls(**indices, cases=item_cases, seed=data["seed"], fraction=data["fraction"])

    def summary(self) -> str:
        """One line: seed, fraction, and cases / items per split."""
        fraction = (
            f"{self.fraction} cases"
            if isinstance(self.fraction, int)
            else f"{100 * self.fraction:g}%"
        )
        parts = [
            f"{name} {len(self.case_ids(name))} cases ({len(getattr(self, name))} items)"
            for name in SPLIT_NAMES
        ]
        return f"seed {self.seed}, training fraction {fraction}: " + ", ".join(parts)


def split_cases(
    cases: Sequence[Hashable],
    strata: Sequence[Hashable] | None,
    *,
    seed: int,
    fraction: float | int,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
) -> Split:
    """Split items by case into train / val / test (see the module docstring).

    cases[i]: the case id of item i (stored as a string); strata[i]: its stratum (class label,
    scanner...), None for no stratification. Strata must be mutually comparable: a case with
    tied strata takes the smallest.
    fraction: a float in (0, 1], the share of the pool (cases not in test or val) used for
    training, rounded half up, at least 1 case; or an int >= 1, that many training cases.
    test_fraction, val_fraction: shares of all cases, rounded half up, at least 1 case each.
    """
    fraction = _checked_fraction(fraction)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise CtxRestoreError(f"seed must be an integer, got {seed!r}")
    for name, share in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0 < share < 1:
            raise CtxRestoreError(f"{name} must be in (0, 1), got {share}")
    if test_fraction + val_fraction >= 1:
        raise CtxRestoreError(
            f"test_fraction {test_fraction} + val_fraction {val_fraction} must be below 1, "
            "to leave cases for training"
        )
    item_cases = tuple(str(case) for case in cases)
    if strata is None:
        strata = [0] * len(item_cases)
    if len(strata) != len(item_cases):
        raise CtxRestoreError(
            f"{len(item_cases)} case ids but {len(strata)} strata; give one per item"
        )

    by_stratum = _shuffled_cases_by_stratum(_case_strata(item_cases, strata), seed)
    num_cases = sum(len(order) for order in by_stratum.values())
    num_test, num_val = _held_out_counts(num_cases, test_fraction, val_fraction)
    test = _take(by_stratum, num_test)
    val = _take(by_stratum, num_val)
    pool = sum(len(order) for order in by_stratum.values())
    if isinstance(fraction, int):
        if fraction > pool:
            raise CtxRestoreError(
                f"{fraction} training cases asked for, but only {pool} of the {num_cases} "
                "cases remain after test and val; ask for fewer or give a float fraction"
            )
        num_train = fraction
    else:
        num_train = max(1, _round_half_up(fraction * pool))
    train = _take(by_stratum, num_train)

    def items_of(chosen: set[str]) -> tuple[int, ...]:
        return tuple(i for i, case in enumerate(item_cases) if case in chosen)

    return Split(
        train=items_of(train),
        val=items_of(val),
        test=items_of(test),
        cases=item_cases,
        seed=int(seed),
        fraction=fraction,
    )


def _held_out_counts(num_cases: int, test_fraction: float, val_fraction: float) -> tuple[int, int]:
    """(test cases, validation cases): the shares rounded half up, at least 1 each, and 1
    training case left. Too few cases shrink validation first, then test, with a warning:
    2 cases train on 1 and test on 1 without validation; 1 case only trains."""
    if num_cases < 1:
        raise CtxRestoreError("no cases to split: the data holds no items")
    num_test = max(1, _round_half_up(test_fraction * num_cases))
    num_val = max(1, _round_half_up(val_fraction * num_cases))
    if num_test + num_val + 1 <= num_cases:
        return num_test, num_val
    shrunk_test = min(num_test, max(num_cases - 2, 1 if num_cases >= 2 else 0))
    shrunk_val = max(0, min(num_val, num_cases - 1 - shrunk_test))
    missing = [
        name for name, count in (("validation", shrunk_val), ("test", shrunk_test)) if not count
    ]
    logger.warning(
        "%d cases are too few for test %d + validation %d + training: using test %d, "
        "validation %d, training %d%s",
        num_cases, num_test, num_val, shrunk_test, shrunk_val,
        num_cases - shrunk_test - shrunk_val,
        f" (no {' and no '.join(missing)} split)" if missing else "",
    )  # fmt: skip
    return shrunk_test, shrunk_val


def parse_fraction(text: str | float | int) -> float | int:
    """A label fraction from the command line. The rule: an integer ("25") is a number of
    training cases; a value with a decimal point or a percent sign is a share of the pool:
    "0.1" and "10%" -> 0.1, "1.0" and "100%" -> all of it, while "1" is one case."""
    if not isinstance(text, str):
        return _checked_fraction(text)
    value = text.strip()
    error = CtxRestoreError(
        f"label fraction {text!r} is not valid; give a share in (0, 1] such as 0.1, a "
        "percentage in (0, 100] such as 10%, or a number of training cases such as 25"
    )
    try:
        if value.endswith("%"):
            parsed: float | int = float(value[:-1]) / 100
        elif value.isdigit():
            parsed = int(value)
        else:
            parsed = float(value)
        return _checked_fraction(parsed)
    except (ValueError, CtxRestoreError):
        raise error from None


def write_split(path: Path | str, split: Split) -> Path:
    return write_json(path, split.to_json())


def read_split(path: Path | str) -> Split:
    try:
        return Split.from_json(read_json(path))
    except CtxRestoreError as error:
        if str(path) in str(error):
            raise
        raise CtxRestoreError(f"{path}: {error}") from None


def _checked_fraction(fraction: object) -> float | int:
    if isinstance(fraction, bool):
        raise CtxRestoreError(f"fraction must be a number, got {fraction!r}")
    if isinstance(fraction, numbers.Integral):
        if fraction < 1:
            raise CtxRestoreError(f"a number of training cases must be >= 1, got {fraction}")
        return int(fraction)
    if isinstance(fraction, numbers.Real):
        if not 0 < fraction <= 1:  # also refuses NaN
            raise CtxRestoreError(
                f"a label fraction must be in (0, 1], got {fraction}; an integer is a number "
                "of cases"
            )
        return float(fraction)
    raise CtxRestoreError(f"fraction must be a float in (0, 1] or an int >= 1, got {fraction!r}")


def _round_half_up(value: float) -> int:
    # Python's round() rounds halves to even (2.5 -> 2), which surprises people reading counts.
    return math.floor(value + 0.5)


def _case_strata(cases: Sequence[str], strata: Sequence[Hashable]) -> dict[str, Hashable]:
    """Each case's stratum: the most common one among its items, ties to the smallest."""
    counts: dict[str, Counter] = {}
    for case, stratum in zip(cases, strata):
        counts.setdefault(case, Counter())[stratum] += 1
    result = {}
    for case, counter in counts.items():
        most = max(counter.values())
        result[case] = min(stratum for stratum, count in counter.items() if count == most)
    return result


def _shuffled_cases_by_stratum(
    case_strata: dict[str, Hashable], seed: int
) -> dict[Hashable, list[str]]:
    """One fixed random order of the cases of each stratum. Depends on the seed and the set of
    cases only, not on item order. random.Random's shuffle is stable across Python versions
    and platforms, so a split can be rebuilt from its seed."""
    by_stratum: dict[Hashable, list[str]] = {}
    for case in sorted(case_strata):
        by_stratum.setdefault(case_strata[case], []).append(case)
    generator = random.Random(seed)
    ordered = {}
    for stratum in sorted(by_stratum):
        cases = by_stratum[stratum]
        generator.shuffle(cases)
        ordered[stratum] = cases
    return ordered


def _take(by_stratum: dict[Hashable, list[str]], count: int) -> set[str]:
    """Remove and return `count` cases from the front of the strata's orders, stratified.

    The choice is a prefix of one sequence (see the module docstring), so a larger count
    always takes a superset of the cases a smaller count takes.
    """
    strata = sorted(by_stratum)
    sizes = [len(by_stratum[stratum]) for stratum in strata]
    taken = [0] * len(strata)

    def priority(index: int) -> tuple[bool, Fraction, int]:
        # Unserved strata first; then the largest size / (taken + 1/2); ties in stratum order.
        return (taken[index] > 0, -Fraction(2 * sizes[index], 2 * taken[index] + 1), index)

    heap = [priority(index) for index in range(len(strata)) if sizes[index]]
    heapq.heapify(heap)
    for _ in range(count):
        index = heapq.heappop(heap)[2]
        taken[index] += 1
        if taken[index] < sizes[index]:
            heapq.heappush(heap, priority(index))
    chosen = set()
    for index, stratum in enumerate(strata):
        chosen.update(by_stratum[stratum][: taken[index]])
        del by_stratum[stratum][: taken[index]]
    return chosen

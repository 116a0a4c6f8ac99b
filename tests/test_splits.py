"""Case-level splits: no leakage, fixed test sets, nested training sets, stratification."""

import itertools
import logging
from collections import Counter

import pytest

from ctxrestore.data.splits import (
    Split,
    _case_strata,
    parse_fraction,
    read_split,
    split_cases,
    write_split,
)
from ctxrestore.errors import CtxRestoreError

FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
COUNTS = (1, 3, 10, 40)


def slices_of_cases(num_cases: int, num_classes: int = 3, slices: int = 4):
    """Items of multi-slice cases, listed in an interleaved order; class = case index % k."""
    cases, strata = [], []
    for slice_index in range(slices + 1):
        for case in range(num_cases):
            if slice_index < slices - case % 2:  # cases have 3 or 4 slices
                cases.append(f"case_{case:03d}")
                strata.append(f"class_{case % num_classes}")
    return cases, strata


def case_sets(split: Split) -> dict[str, set[str]]:
    return {name: set(split.case_ids(name)) for name in ("train", "val", "test")}


@pytest.mark.parametrize("fraction", FRACTIONS + COUNTS)
def test_no_case_has_items_in_two_splits_and_every_item_of_a_case_goes_along(fraction):
    cases, strata = slices_of_cases(60)
    split = split_cases(cases, strata, seed=3, fraction=fraction)
    sets = case_sets(split)
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    for name, chosen in sets.items():
        items = getattr(split, name)
        assert list(items) == sorted(items)
        assert set(items) == {i for i, case in enumerate(cases) if case in chosen}
    assert split.cases == tuple(cases)


def test_test_and_val_are_the_same_for_every_fraction_and_count():
    cases, strata = slices_of_cases(80)
    splits = [split_cases(cases, strata, seed=7, fraction=f) for f in FRACTIONS + COUNTS]
    for split in splits[1:]:
        assert split.test == splits[0].test
        assert split.val == splits[0].val
    assert len(splits[0].case_ids("test")) == 16  # 20% of 80 cases
    assert len(splits[0].case_ids("val")) == 8


def test_training_sets_are_nested_as_the_fraction_grows():
    cases, strata = slices_of_cases(200, num_classes=4)
    trains = [case_sets(split_cases(cases, strata, seed=1, fraction=f))["train"] for f in FRACTIONS]
    counts = [
        case_sets(split_cases(cases, strata, seed=1, fraction=n))["train"] for n in range(1, 141)
    ]
    for sequence in (trains, counts):
        for smaller, larger in itertools.pairwise(sequence):
            assert smaller < larger
    assert trains[0] <= counts[9] <= trains[1]  # 5% of 140 = 7, 10 cases, 10% = 14


def test_training_set_at_fraction_one_is_the_whole_pool():
    cases, strata = slices_of_cases(50)
    split = split_cases(cases, strata, seed=0, fraction=1.0)
    assert set(split.train) | set(split.val) | set(split.test) == set(range(len(cases)))


def test_the_seed_decides_the_split():
    cases, strata = slices_of_cases(100)
    first = split_cases(cases, strata, seed=5, fraction=0.1)
    assert split_cases(cases, strata, seed=5, fraction=0.1) == first
    other = split_cases(cases, strata, seed=6, fraction=0.1)
    assert other.test != first.test
    assert other.train != first.train


def test_the_split_does_not_depend_on_the_order_of_the_items():
    cases, strata = slices_of_cases(40)
    order = sorted(range(len(cases)), key=lambda i: (cases[i], -i))
    reordered = split_cases(
        [cases[i] for i in order], [strata[i] for i in order], seed=2, fraction=0.5
    )
    split = split_cases(cases, strata, seed=2, fraction=0.5)
    assert case_sets(reordered) == case_sets(split)


def test_training_cases_are_stratified_in_proportion():
    cases = [f"patient_{i}" for i in range(900)]
    strata = [i % 9 for i in range(900)]
    split = split_cases(cases, strata, seed=0, fraction=0.1)
    per_class = Counter(strata[i] for i in split.train)
    # 900 cases: 180 test, 90 val, pool 630 (70 per class), 10% -> 63, 7 per class
    assert len(split.train) == 63
    assert all(abs(per_class[k] - 7) <= 1 for k in range(9))
    for name, expected in (("test", 20), ("val", 10)):
        counts = Counter(strata[i] for i in getattr(split, name))
        assert all(abs(counts[k] - expected) <= 1 for k in range(9))


def test_unequal_strata_keep_their_shares():
    sizes = {"liver": 500, "kidney": 250, "spleen": 150, "pancreas": 100}
    strata = [name for name, size in sizes.items() for _ in range(size)]
    cases = [f"case_{i}" for i in range(len(strata))]
    for fraction in (0.1, 0.25, 0.5):
        split = split_cases(cases, strata, seed=4, fraction=fraction)
        per_class = Counter(strata[i] for i in split.train)
        pool = {name: size - round(0.3 * size) for name, size in sizes.items()}
        for name in sizes:
            assert abs(per_class[name] - fraction * pool[name]) <= 1, (fraction, per_class)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 17, 30])
def test_counts_are_exact_and_every_stratum_is_trained_on_when_possible(count):
    sizes = [40, 30, 10, 5, 5]  # rare classes too
    strata = [k for k, size in enumerate(sizes) for _ in range(size)]
    cases = [f"c{i}" for i in range(len(strata))]
    split = split_cases(cases, strata, seed=9, fraction=count)
    assert len(split.case_ids("train")) == count
    seen = {strata[i] for i in split.train}
    assert len(seen) == min(count, len(sizes))
    if count < len(sizes):
        assert seen == set(range(count))  # the largest strata come first


def test_a_case_takes_the_most_common_stratum_of_its_items():
    # a: two items "x", one "y" -> x; b: a tie between "z" and "y" -> y (the smaller)
    cases = ["a", "a", "a", "b", "b", "c"]
    strata = ["x", "y", "x", "z", "y", "z"]
    assert _case_strata(cases, strata) == {"a": "x", "b": "y", "c": "z"}


def test_without_strata_the_counts_still_hold():
    cases = [f"v{i // 5}" for i in range(5 * 30)]
    split = split_cases(cases, None, seed=0, fraction=0.5)
    assert [len(split.case_ids(n)) for n in ("train", "val", "test")] == [11, 3, 6]
    assert len(split.train) == 5 * 11


def test_json_round_trip(tmp_path):
    cases, strata = slices_of_cases(30)
    for fraction in (0.25, 5, 1.0):
        split = split_cases(cases, strata, seed=11, fraction=fraction)
        path = write_split(tmp_path / "split.json", split)
        again = read_split(path)
        assert again == split
        assert type(again.fraction) is type(fraction)
    data = split.to_json()
    assert data["cases"]["test"] == sorted(data["cases"]["test"])
    assert data["num_items"]["train"] == len(split.train)
    assert data["num_cases"]["val"] == len(split.case_ids("val"))
    assert "test" in split.summary() and "100%" in split.summary()


def test_damaged_split_files_are_refused(tmp_path):
    cases, strata = slices_of_cases(30)
    data = split_cases(cases, strata, seed=0, fraction=0.5).to_json()
    data["cases"]["val"].append(data["cases"]["test"][0])
    del data["num_items"]
    with pytest.raises(CtxRestoreError, match="is in both"):
        Split.from_json(data)
    del data["item_cases"]
    path = tmp_path / "bad.json"
    path.write_text("{}")
    with pytest.raises(CtxRestoreError, match=r"bad\.json: split is missing seed"):
        read_split(path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0.1", 0.1),
        ("10%", 0.1),
        (" 12.5% ", 0.125),
        ("1.0", 1.0),
        ("100%", 1.0),
        ("25", 25),
        ("1", 1),
        (".5", 0.5),
        (0.25, 0.25),
        (7, 7),
    ],
)
def test_parse_fraction(text, expected):
    parsed = parse_fraction(text)
    assert parsed == pytest.approx(expected)
    assert type(parsed) is type(expected)


@pytest.mark.parametrize("text", ["0", "0.0", "1.5", "150%", "-3", "ten", "", "nan", "5 cases"])
def test_parse_fraction_refuses_bad_text(text):
    with pytest.raises(CtxRestoreError, match="is not valid; give a share in"):
        parse_fraction(text)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(fraction=0.0), r"must be in \(0, 1\], got 0.0"),
        (dict(fraction=1.5), r"must be in \(0, 1\], got 1.5"),
        (dict(fraction=-0.1), r"must be in \(0, 1\]"),
        (dict(fraction=float("nan")), r"must be in \(0, 1\]"),
        (dict(fraction=True), "must be a number, got True"),
        (dict(fraction=0), "must be >= 1, got 0"),
        (dict(fraction="0.1"), "must be a float in"),
        (dict(fraction=100), "100 training cases asked for, but only 35 of the 50"),
        (dict(fraction=0.1, test_fraction=0.6, val_fraction=0.4), "must be below 1"),
        (dict(fraction=0.1, test_fraction=0.0), r"test_fraction must be in \(0, 1\)"),
        (dict(fraction=0.1, val_fraction=1.0), r"val_fraction must be in \(0, 1\)"),
        (dict(fraction=0.1, seed=1.5), "seed must be an integer"),
    ],
)
def test_bad_options_are_refused(options, message):
    cases = [f"c{i}" for i in range(50)]
    options = {"seed": 0, **options}
    with pytest.raises(CtxRestoreError, match=message):
        split_cases(cases, None, **options)


@pytest.mark.parametrize(
    ("num_cases", "counts", "warning"),
    [
        (1, [1, 0, 0], "no validation and no test split"),
        (2, [1, 0, 1], "no validation split"),
        (3, [1, 1, 1], None),  # the smallest complete split
    ],
)
def test_few_cases_shrink_validation_then_test_with_a_warning(num_cases, counts, warning, caplog):
    cases = [f"case{i}" for i in range(num_cases) for _ in range(4)]  # 4 slices per volume
    with caplog.at_level(logging.WARNING, logger="ctxrestore.data.splits"):
        split = split_cases(cases, None, seed=0, fraction=1.0)
    assert [len(split.case_ids(n)) for n in ("train", "val", "test")] == counts
    assert len(split.train) == 4 * counts[0]
    if warning is None:
        assert not caplog.records
    else:
        assert warning in caplog.text and f"{num_cases} cases are too few" in caplog.text


def test_shares_that_leave_no_training_case_shrink_validation():
    split = split_cases(
        [str(i) for i in range(10)], None, seed=0, fraction=1.0, test_fraction=0.5,
        val_fraction=0.45,
    )  # fmt: skip
    assert [len(split.case_ids(n)) for n in ("train", "val", "test")] == [1, 4, 5]


def test_mismatched_strata_and_no_cases_are_refused():
    with pytest.raises(CtxRestoreError, match="3 case ids but 2 strata"):
        split_cases(["a", "b", "c"], ["x", "y"], seed=0, fraction=0.5)
    with pytest.raises(CtxRestoreError, match="no cases to split"):
        split_cases([], None, seed=0, fraction=0.5)

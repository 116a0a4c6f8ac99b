"""The label-efficiency benchmark: its statistics against hand-computed values, the grid end to
end through the CLI on a tiny phantom (outputs, skipping, resuming, refusing other settings),
the report's words against known numbers, and a tiny ablation."""

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ctxrestore.api as api
import ctxrestore.bench.benchmark as benchmark_module
from ctxrestore.bench import mean_ci, paired_difference, relative_reduction
from ctxrestore.bench.benchmark import (
    BenchmarkOptions,
    build_protocol,
    method_options,
    parse_methods,
)
from ctxrestore.bench.protocol import LATER_OPTIONS, Arm, Protocol, check_settings
from ctxrestore.bench.report import write_report
from ctxrestore.bench.stats import higher_is_better
from ctxrestore.bench.summary import class_metrics, extra_metrics, markdown_table, summarize
from ctxrestore.cli import app
from ctxrestore.engine.checkpoint import load_checkpoint, weights_fingerprint
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import write_json
from ctxrestore.models import build_model
from ctxrestore.pretext import list_pretexts

runner = CliRunner()
TINY = dict(task="classify", methods="random,context_restoration", fractions="0.35,1.0", seeds=2,
            num_images=40, image_size=32, width=4, pretrain_images=32, pretrain_steps=2,
            pretrain_batch_size=8, max_steps=2, batch_size=8, patch_size=4, num_swaps=5,
            device="cpu")  # fmt: skip
# Student t quantiles from scipy.stats.t.ppf, written out so the test does not trust scipy.
T_975 = {1: 12.706204736174707, 2: 4.302652729911275, 3: 3.182446305284263}
T_95_DF3 = 2.353363434801823


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run faster on one thread, and far faster when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- statistics
def test_mean_ci_of_one_to_four_is_the_t_interval():
    half = T_975[3] * math.sqrt(5 / 3) / math.sqrt(4)  # sample sd of 1..4 is sqrt(5/3)
    assert mean_ci([1, 2, 3, 4]) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert mean_ci([1, 2, 3, 4])[1] == pytest.approx(0.445739, abs=1e-6)
    half_90 = T_95_DF3 * math.sqrt(5 / 3) / 2
    assert mean_ci([1, 2, 3, 4], 0.90) == pytest.approx((2.5, 2.5 - half_90, 2.5 + half_90))


def test_mean_ci_edge_cases():
    mean, low, high = mean_ci([0.7])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in mean_ci([]))
    assert mean_ci([1, 2, float("nan"), 3, 4]) == mean_ci([1, 2, 3, 4])  # undefined: left out
    with pytest.raises(CtxRestoreError, match="confidence"):
        mean_ci([1, 2], confidence=95)


def test_paired_difference_known_values():
    # differences 0.2, 0.0, 0.4: mean 0.2, sd 0.2; the tie is not a win
    difference = paired_difference([0.8, 0.7, 0.9], [0.6, 0.7, 0.5])
    half = T_975[2] * 0.2 / math.sqrt(3)
    assert difference.mean == pytest.approx(0.2)
    assert (difference.low, difference.high) == pytest.approx((0.2 - half, 0.2 + half))
    assert (difference.wins, difference.n) == (2, 3)
    lower = paired_difference([3.0, 4.0, 2.0], [4.0, 4.0, 5.0], higher_is_better=False)
    assert (lower.mean, lower.wins, lower.n) == (pytest.approx(-4 / 3), 2, 3)
    skipped = paired_difference([1.0, float("nan"), 3.0], [0.0, 1.0, 1.0])
    assert (skipped.mean, skipped.n) == (pytest.approx(1.5), 2)
    with pytest.raises(CtxRestoreError, match="same number of runs"):
        paired_difference([1.0, 2.0], [1.0])


def test_pairs_sharing_a_pretraining_count_once_in_the_interval():
    # Differences 0.2 and 0.4 from pretraining "a", 0.0 from "b": the pretrainings' means are
    # 0.3 and 0.0, so the interval has 1 degree of freedom: mean 0.15, sd 0.3 / sqrt(2).
    a, b = [0.8, 0.9, 0.7], [0.6, 0.5, 0.7]
    grouped = paired_difference(a, b, groups=["a", "a", "b"])
    half = T_975[1] * (0.3 / math.sqrt(2)) / math.sqrt(2)
    assert grouped.mean == pytest.approx(0.15)
    assert (grouped.low, grouped.high) == pytest.approx((0.15 - half, 0.15 + half))
    assert (grouped.wins, grouped.n) == (2, 3)  # wins and n still count pairs
    # Every pair its own pretraining: the pairs are the draws, as without groups. One shared
    # pretraining cannot show its variation: the pairs as they are, too.
    for groups in (["a", "b", "c"], ["a", "a", "a"]):
        assert paired_difference(a, b, groups=groups) == paired_difference(a, b)
    # A pair left out (not finite) takes its label with it: "a" keeps one pair (0.4).
    nan = float("nan")
    skipped = paired_difference([nan, 0.9, 0.7], [0.6, 0.5, 0.7], groups=["a", "a", "b"])
    assert (skipped.mean, skipped.n) == (pytest.approx(0.2), 2)
    # Reductions 0.2 and 0.1 from pretraining 0 (mean 0.15), 0.4 from 1: mean 0.275, sd 0.25/sqrt(2)
    half = T_975[1] * 0.125
    assert relative_reduction([8.0, 9.0, 6.0], [10.0, 10.0, 10.0], groups=[0, 0, 1]) == (
        pytest.approx((0.275, 0.275 - half, 0.275 + half))
    )
    with pytest.raises(CtxRestoreError, match="one pretraining label per pair"):
        paired_difference(a, b, groups=["a", "b"])


def test_relative_reduction_and_direction():
    # (10 - 8) / 10 = 0.2 and (10 - 9) / 10 = 0.1: mean 0.15, sd 0.05 * sqrt(2)
    mean, low, high = relative_reduction([8.0, 9.0], [10.0, 10.0])
    half = T_975[1] * (0.05 * math.sqrt(2)) / math.sqrt(2)
    assert (mean, low, high) == pytest.approx((0.15, 0.15 - half, 0.15 + half))
    assert higher_is_better("macro_f1") and higher_is_better("global_dice/mean")
    assert not higher_is_better("wall_mm/mean") and not higher_is_better("hd95/whole_tumour")


# ----------------------------------------------------------------------------- the report
def _synthetic(tmp_path, metric="wall_mm/mean"):
    """Known numbers: context restoration 20% lower error than random at 0.1 in every seed,
    2 mm worse at 1.0; relative_position ahead of it at 1.0."""
    arms = (Arm("random"), Arm("context_restoration", {"method": "context_restoration"}),
            Arm("relative_position", {"method": "relative_position"}))  # fmt: skip
    protocol = Protocol(
        kind="benchmark", task="localize", out=tmp_path, arms=arms, fractions=("0.1", "1.0"),
        seeds=(0, 1, 2), metric=metric, pretrain_options={}, finetune_options={},
        settings={"phantom": "abdomen", "task": "localize"},
    )  # fmt: skip
    errors = {
        ("random", "0.1"): [10.0, 11.0, 12.0],
        ("context_restoration", "0.1"): [8.0, 8.8, 9.6],
        ("relative_position", "0.1"): [10.5, 10.0, 12.5],
        ("random", "1.0"): [4.0, 4.2, 4.1],
        ("context_restoration", "1.0"): [6.0, 6.3, 6.1],
        ("relative_position", "1.0"): [3.9, 4.0, 4.1],
    }
    rows = [{"task": "localize", "method": method, "fraction": fraction, "seed": seed,
             "train_cases": 10, "steps": 5, "best_step": 5, metric: value}
            for (method, fraction), values in errors.items()
            for seed, value in enumerate(values)]  # fmt: skip
    for arm in arms[1:]:
        write_json(tmp_path / "pretrain" / arm.name / "metrics.json",
                   {"steps": 5, "final_loss": 0.1, "summary": f"{arm.name} learned."})  # fmt: skip
    return protocol, rows


def test_report_says_what_known_numbers_show(tmp_path):
    protocol, rows = _synthetic(tmp_path)
    methods = [arm.name for arm in protocol.arms]
    table = summarize(rows, methods=methods, fractions=protocol.fractions, metric=protocol.metric)
    restoration = next(e for e in table if e["method"] == "context_restoration")
    assert restoration["rel_reduction"] == pytest.approx(0.2)  # every pair 20% lower
    assert restoration["wins"] == 3 and restoration["diff_mean"] == pytest.approx(-2.2)
    report = write_report(tmp_path / "report.md", protocol, rows, table, tmp_path / "plot.png")
    text = report.read_text()
    for part in ("## What the numbers show", "## Summary", "## Pretraining", "## Settings",
                 "![wall_mm/mean against label fraction](plot.png)", "Caveats",
                 "reduction from random", "context_restoration learned."):  # fmt: skip
        assert part in text, part
    assert "Fraction 0.1: best mean wall_mm/mean is **context_restoration**" in text
    assert "context_restoration vs random: better at 0.1" in text
    assert "worse at 1.0" in text
    beats = (
        "interval of the paired difference below zero (lower) at fraction(s) 0.1, but not at 1.0"
    )
    assert f"context_restoration beats random with the 95% {beats}" in text
    assert "With all labels (fraction 1.0) it is worse than random" in text
    assert "1.0 (behind relative_position)" in text
    assert "20.0% [20.0%, 20.0%]" in "\n".join(
        markdown_table(table, metric=protocol.metric, reference="random", labels={})
    )


def test_summary_counts_pairs_that_share_a_pretraining_once(tmp_path):
    # Seeds 0 and 2 fine-tuned from pretraining 0 (2.0 and 2.4 mm better than random), seed 1
    # from pretraining 1 (1.6 mm): the interval is over the pretrainings' means, 2.2 and 1.6.
    protocol, rows = _synthetic(tmp_path)
    for row in rows:
        row["pretrain_seed"] = "" if row["method"] == "random" else row["seed"] % 2
        if (row["method"], row["fraction"], row["seed"]) == ("context_restoration", "0.1", 1):
            row["wall_mm/mean"] = 9.4
    methods = [arm.name for arm in protocol.arms]
    table = summarize(rows, methods=methods, fractions=("0.1",), metric=protocol.metric)
    restoration = next(e for e in table if e["method"] == "context_restoration")
    half = T_975[1] * (0.6 / math.sqrt(2)) / math.sqrt(2)
    assert restoration["diff_mean"] == pytest.approx(-1.9)
    assert (restoration["diff_low"], restoration["diff_high"]) == pytest.approx(
        (-1.9 - half, -1.9 + half)
    )
    assert (restoration["wins"], restoration["pairs"]) == (3, 3)
    # Reductions 20% and 20% from pretraining 0, 1.6 / 11 from pretraining 1.
    second = 1.6 / 11
    half = T_975[1] * ((0.2 - second) / math.sqrt(2)) / math.sqrt(2)
    middle = (0.2 + second) / 2
    assert (restoration["rel_reduction"], restoration["rel_low"], restoration["rel_high"]) == (
        pytest.approx((middle, middle - half, middle + half))
    )
    # The report tells each pretraining's own transfer apart.
    protocol = dataclasses.replace(protocol, pretrain_seeds=2)
    for arm in protocol.arms[1:]:
        for k in (0, 1):
            write_json(tmp_path / "pretrain" / arm.name / f"seed_{k}" / "metrics.json",
                       {"steps": 5, "final_loss": 0.1, "summary": "learned."})  # fmt: skip
    table = summarize(rows, methods=methods, fractions=protocol.fractions, metric=protocol.metric)
    text = write_report(tmp_path / "r.md", protocol, rows, table, tmp_path / "p.png").read_text()
    assert "its fine-tunes against random (mean paired difference) |" in text
    link = "(pretrain/context_restoration/seed_{}/report.md)"
    assert (
        f"{link.format(0)} | 0 | 5 | 0.1 | learned. | 0.1: -2.2 (2 runs); 1.0: +2 (2 runs) |"
        in text
    )
    assert (
        f"{link.format(1)} | 1 | 5 | 0.1 | learned. | 0.1: -1.6 (1 run); 1.0: +2.1 (1 run) |"
        in text
    )
    assert "the paired intervals are over the 2 pretrainings" in text


def test_report_warns_when_runs_were_computed_in_several_environments(tmp_path):
    protocol, rows = _synthetic(tmp_path)
    methods = [arm.name for arm in protocol.arms]
    table = summarize(rows, methods=methods, fractions=protocol.fractions, metric=protocol.metric)
    for row in rows:
        row["environment"] = "torch 2, cpu AVX512, 1 process(es)"
    text = write_report(tmp_path / "a.md", protocol, rows, table, tmp_path / "p.png").read_text()
    assert "environments" not in text  # one environment: nothing to say
    rows[0]["environment"] = "torch 2, cpu AVX2, 1 process(es)"  # resumed on another machine
    text = write_report(tmp_path / "b.md", protocol, rows, table, tmp_path / "p.png").read_text()
    assert (
        "The runs ran in 2 environments (torch 2, cpu AVX2, 1 process(es): 1 run; "
        "torch 2, cpu AVX512, 1 process(es): 17 runs)" in text
    )


def test_report_of_a_higher_is_better_metric_has_no_reduction_column(tmp_path):
    protocol, rows = _synthetic(tmp_path, metric="iou/mean")
    methods = [arm.name for arm in protocol.arms]
    table = summarize(rows, methods=methods, fractions=protocol.fractions, metric="iou/mean")
    assert "rel_reduction" not in table[0]
    text = write_report(tmp_path / "report.md", protocol, rows, table, tmp_path / "p.png")
    # Larger is better now: context restoration's larger values at 1.0 are the better ones.
    assert "context_restoration vs random: worse at 0.1" in text.read_text()
    assert "reduction from" not in text.read_text()


def test_class_metrics_are_the_members_of_the_metrics_family():
    available = ["macro_f1", "f1/head", "f1/femur", "accuracy", "precision/head",
                 "wall_mm/mean", "wall_mm/liver", "iou/liver", "global_dice/mean",
                 "global_dice/oedema", "dice/oedema"]  # fmt: skip
    assert class_metrics("macro_f1", available) == ("f1/femur", "f1/head")
    assert class_metrics("wall_mm/mean", available) == ("wall_mm/liver",)
    assert class_metrics("global_dice/mean", available) == ("global_dice/oedema",)
    assert class_metrics("accuracy", available) == ()
    assert class_metrics("iou/liver", available) == ()  # one class already


def test_report_says_which_classes_the_difference_comes_from(tmp_path):
    # Per organ at 0.1: liver 2 mm lower with context restoration in every seed (better),
    # spleen 1 mm higher in every seed (worse), aorta +1, -1, 0 (no clear difference).
    protocol, rows = _synthetic(tmp_path)
    change = {"liver": [-2.0, -2.1, -1.9], "spleen": [1.0, 1.1, 0.9], "aorta": [1.0, -1.0, 0.0]}
    for row in rows:
        for organ, shifts in change.items():
            shift = shifts[row["seed"]] if row["method"] == "context_restoration" else 0.0
            row[f"wall_mm/{organ}"] = 10.0 + shift if row["fraction"] == "0.1" else 5.0
    methods = [arm.name for arm in protocol.arms]
    table = summarize(rows, methods=methods, fractions=protocol.fractions, metric=protocol.metric)
    text = write_report(tmp_path / "r.md", protocol, rows, table, tmp_path / "p.png").read_text()
    section = text.split("## Per class", 1)[1].split("## Pretraining", 1)[0]
    assert "per class (`wall_mm/<class>`, lower is better)" in section
    assert "| class | 0.1 | 1.0 |" in section
    liver = next(line for line in section.splitlines() if line.startswith("| liver |"))
    # -2 +- t(2) * 0.1 / sqrt(3), bold: below zero; at 1.0 no difference at all, no wins.
    assert liver == "| liver | **-2 [-2.25, -1.75], 3/3** | +0 [+0, +0], 0/3 |"
    aorta = next(line for line in section.splitlines() if line.startswith("| aorta |"))
    assert aorta.startswith("| aorta | +0 [") and "**" not in aorta and ", 1/3 |" in aorta
    assert "- Clearly better: liver at 0.1." in section
    assert "- Clearly worse: spleen at 0.1." in section
    # A metric that averages no classes has no such section.
    protocol = dataclasses.replace(protocol, metric="accuracy")
    for row in rows:
        row["accuracy"] = 0.5
    table = summarize(rows, methods=methods, fractions=protocol.fractions, metric="accuracy")
    assert "## Per class" not in write_report(tmp_path / "a.md", protocol, rows, table,
                                               tmp_path / "p.png").read_text()  # fmt: skip


def test_report_counts_the_runs_that_lost_a_class(tmp_path):
    protocol, rows = _synthetic(tmp_path)
    for row in rows:
        row["detection_rate/liver"] = row["detection_rate/spleen"] = 0.8
    lost = {("random", "0.1", 2): ["spleen"],
            ("context_restoration", "0.1", 0): ["liver", "spleen"]}  # fmt: skip
    for row in rows:
        for organ in lost.get((row["method"], row["fraction"], row["seed"]), []):
            row[f"detection_rate/{organ}"] = 0.0
    rows[-1]["detection_rate/liver"] = float("nan")  # never present: not lost
    methods = [arm.name for arm in protocol.arms]
    table = summarize(rows, methods=methods, fractions=protocol.fractions, metric=protocol.metric)
    text = write_report(tmp_path / "r.md", protocol, rows, table, tmp_path / "p.png").read_text()
    section = text.split("## Lost classes", 1)[1].split("## Pretraining", 1)[0]
    titles = {arm.name: arm.title for arm in protocol.arms}
    assert f"| {titles['random']} | 1/3 (seed 2: spleen) | 0/3 |" in section
    assert f"| {titles['context_restoration']} | 1/3 (seed 0: liver, spleen) | 0/3 |" in section
    assert f"| {titles['relative_position']} | 0/3 | 0/3 |" in section
    assert "- 2 of 18 runs lost a class." in section
    for row in rows:
        row["detection_rate/liver"] = row["detection_rate/spleen"] = 0.8
    text = write_report(tmp_path / "r.md", protocol, rows, table, tmp_path / "p.png").read_text()
    assert "- No run lost a class." in text
    for row in rows:  # no per-class detection rates: no section
        del row["detection_rate/liver"], row["detection_rate/spleen"]
    text = write_report(tmp_path / "r.md", protocol, rows, table, tmp_path / "p.png").read_text()
    assert "## Lost classes" not in text


def test_report_without_random_has_no_differences(tmp_path):
    protocol, rows = _synthetic(tmp_path)
    pretrained = tuple(arm for arm in protocol.arms if arm.name != "random")
    protocol = dataclasses.replace(protocol, arms=pretrained)
    methods = [arm.name for arm in pretrained]
    table = summarize(rows, methods=methods, fractions=protocol.fractions,
                      metric=protocol.metric, reference=None)  # fmt: skip
    assert all(entry["pairs"] is None for entry in table)
    text = write_report(tmp_path / "report.md", protocol, rows, table, tmp_path / "p.png")
    assert "difference from" not in text.read_text()
    assert "Fraction 1.0: best mean wall_mm/mean is **relative_position**" in text.read_text()


def test_report_reads_a_longer_random_control_as_a_head_start_check(tmp_path):
    # Random weights trained twice as long catch up with context restoration at 0.1 (within
    # 0.1 mm in every seed) and gain nothing at 1.0.
    protocol, rows = _synthetic(tmp_path)
    control = Arm("random_x2", label="random, 2x schedule", schedule_factor=2)
    protocol = dataclasses.replace(protocol, arms=(protocol.arms[0], control, *protocol.arms[1:]))
    errors = {"0.1": [8.1, 8.9, 9.5], "1.0": [4.0, 4.2, 4.1]}
    rows += [{**row, "method": "random_x2", "steps": 10,
              "wall_mm/mean": errors[row["fraction"]][row["seed"]]}
             for row in rows if row["method"] == "random"]  # fmt: skip
    methods = [arm.name for arm in protocol.arms]
    table = summarize(rows, methods=methods, fractions=protocol.fractions, metric=protocol.metric)
    text = write_report(tmp_path / "r.md", protocol, rows, table, tmp_path / "p.png").read_text()
    assert (
        "- Random weights get better with the longer schedule (random, 2x schedule) at "
        "fraction(s) 0.1: the shared schedule under-trains them there"
    ) in text
    assert "context_restoration vs random, 2x schedule: no clear difference at 0.1 (" in text
    assert "worse at 1.0" in text.split("vs random, 2x schedule:")[1].split("\n")[0]
    assert "random, 2x schedule vs random: better at 0.1" in text
    # The control is not a pretrained initialisation: the ranking leaves it out.
    assert "1.0 (behind relative_position)." in text


def test_methods_take_longer_random_controls_in_a_fixed_order():
    assert parse_methods("context_restoration,random_x4,random,random_x2") == (
        "random", "random_x2", "random_x4", "context_restoration")  # fmt: skip
    for bad in ("random_x1", "random_x0", "random_xx", "random_x"):
        with pytest.raises(CtxRestoreError, match=rf"unknown method\(s\) {bad}; .*random_xK"):
            parse_methods(f"random,{bad}")


def test_a_longer_random_control_trains_k_times_the_schedule_on_the_same_splits(tmp_path):
    first = {**TINY, "methods": "random", "fractions": "1.0", "seeds": 1}
    api.benchmark(out=tmp_path / "out", **first)
    result = api.benchmark(out=tmp_path / "out", **{**first, "methods": "random,random_x3"})
    assert (result.runs, result.trained, result.skipped) == (2, 1, 1)  # the grid grew by one
    with (tmp_path / "out" / "results.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert (rows["random"]["steps"], rows["random_x3"]["steps"]) == ("2", "6")
    runs = tmp_path / "out" / "runs"
    configs = [json.loads((runs / m / "fraction_1.0/seed_0/config.json").read_text())
               for m in ("random", "random_x3")]  # fmt: skip
    assert [(c["epochs"], c["max_steps"], c["init"]) for c in configs] == [
        (60, 2, "random"), (180, 6, "random")]  # fmt: skip
    splits = [(runs / m / "fraction_1.0/seed_0/split.json").read_text()
              for m in ("random", "random_x3")]  # fmt: skip
    assert splits[0] == splits[1]
    assert "random, 3x schedule" in result.report.read_text()


def test_segmentation_summaries_show_the_brats_regions():
    regions = ("global_dice/whole_tumour", "global_dice/tumour_core",
               "global_dice/enhancing_tumour")  # fmt: skip
    keys = ["global_dice/mean", "global_dice/oedema", "dice/whole_tumour", *regions]
    assert extra_metrics("segment", "global_dice/mean", keys) == regions
    other = ["global_dice/mean", "global_dice/liver", "global_dice/spleen"]
    assert extra_metrics("segment", "global_dice/mean", other) == tuple(other[1:])
    assert extra_metrics("classify", "macro_f1", keys) == ()


# ----------------------------------------------------------------------------- the grid
def _arguments(out, options):
    data = [part for key, value in options.items() if key != "task"
            for part in (f"--{key.replace('_', '-')}", str(value))]  # fmt: skip
    return ["benchmark", "--task", options["task"], "--out", str(out), *data]


@pytest.fixture(scope="module")
def benchmark_out(tmp_path_factory):
    """One tiny benchmark through the CLI: 2 methods x 2 fractions x 2 seeds."""
    out = tmp_path_factory.mktemp("bench") / "out"
    result = runner.invoke(app, _arguments(out, TINY))
    assert result.exit_code == 0, result.output
    return out


def _finished(out):
    return {path: path.stat().st_mtime_ns for path in sorted(out.rglob("metrics.json"))}


def test_benchmark_writes_results_summary_plot_and_report(benchmark_out):
    with (benchmark_out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2
    assert {(r["method"], r["fraction"], r["seed"]) for r in rows} == {
        (m, f, s) for m in ("random", "context_restoration") for f in ("0.35", "1.0")
        for s in ("0", "1")
    }  # fmt: skip
    for column in ("task", "train_cases", "steps", "best_step", "macro_f1", "accuracy"):
        assert column in rows[0], column
    assert {r["train_cases"] for r in rows if r["fraction"] == "0.35"} == {"10"}
    assert not (benchmark_out / "probe").exists()  # one pretraining each: no draws to compare
    # Every run in one environment, named: what its numbers were computed on.
    capability = torch.backends.cpu.get_cpu_capability()
    assert {r["environment"] for r in rows} == {
        f"torch {torch.__version__}, cpu {capability}, 1 process(es)"
    }
    with (benchmark_out / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 2 * 2 and summary[1]["pairs"] == "2"
    assert (benchmark_out / "plot.png").stat().st_size > 5000
    report = (benchmark_out / "report.md").read_text()
    for part in ("# Label-efficiency benchmark: classify", "## What the numbers show",
                 "Best initialisation at each fraction", "context_restoration vs random:",
                 "Context restoration, the paper's method", "With all labels (fraction 1.0)",
                 "## Summary", "| fraction | initialisation | seeds | macro_f1 (95% CI) |",
                 "![macro_f1 against label fraction](plot.png)", "## Pretraining",
                 "## Settings", "Caveats", "## Per class", "per class (`f1/<class>`",
                 "| class | 0.35 | 1.0 |", "| head |"):  # fmt: skip
        assert part in report, part
    assert (benchmark_out / "pretrain" / "context_restoration" / "model.safetensors").is_file()
    assert not (benchmark_out / "pretrain" / "random").exists()


def test_benchmark_again_skips_every_finished_run(benchmark_out):
    before = _finished(benchmark_out)
    assert len(before) == 8 + 1  # the runs and the one pretraining
    result = api.benchmark(out=benchmark_out, **TINY)
    assert (result.trained, result.skipped, result.runs) == (0, 8, 8)
    assert _finished(benchmark_out) == before


def test_benchmark_reruns_only_the_run_without_metrics(benchmark_out):
    lost = benchmark_out / "runs" / "context_restoration" / "fraction_0.35" / "seed_1"
    (lost / "metrics.json").unlink()
    before = _finished(benchmark_out)
    result = api.benchmark(out=benchmark_out, **TINY)
    assert (result.trained, result.skipped) == (1, 7)
    after = _finished(benchmark_out)
    assert set(after) - set(before) == {lost / "metrics.json"}
    assert {path: after[path] for path in before} == before


def test_benchmark_refuses_other_settings_in_the_same_out(benchmark_out):
    with pytest.raises(CtxRestoreError, match=r"pretrain_steps: 2 -> 3.*another --out"):
        api.benchmark(out=benchmark_out, **{**TINY, "pretrain_steps": 3})
    with pytest.raises(CtxRestoreError, match=r"seeds: 2 -> 1"):
        api.benchmark(out=benchmark_out, **{**TINY, "seeds": 1})
    result = runner.invoke(app, _arguments(benchmark_out, {**TINY, "fractions": "0.5,1.0"}))
    assert result.exit_code == 2 and "fractions" in result.output


# ----------------------------------------------------------------------------- compare
def _copied_runs(benchmark_out, tmp_path):
    """The benchmark's run folders and tables as they are now, copied: tests edit them."""
    copy = tmp_path / "bench"
    shutil.copytree(benchmark_out / "runs", copy / "runs")
    for name in ("results.csv", "summary.csv"):
        shutil.copy(benchmark_out / name, copy / name)
    return copy


def _csv(path):
    with Path(path).open() as handle:
        return list(csv.DictReader(handle))


def test_compare_repeats_the_benchmark_from_its_run_folders(benchmark_out, tmp_path):
    """The same runs named by hand give the benchmark's summary to the last digit."""
    copy = _copied_runs(benchmark_out, tmp_path)
    result = runner.invoke(app, [
        "compare", "--arm", f"random={copy}/runs/random/*/*", "--arm",
        f"context_restoration={copy}/runs/context_restoration/*/*", "--out", str(tmp_path / "c"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _csv(tmp_path / "c" / "summary.csv") == _csv(copy / "summary.csv")
    ours = {
        (r["method"], r["fraction"], r["seed"]): r for r in _csv(tmp_path / "c" / "results.csv")
    }
    theirs = {(r["method"], r["fraction"], r["seed"]): r for r in _csv(copy / "results.csv")}
    assert ours.keys() == theirs.keys()
    for key, row in theirs.items():
        assert {k: v for k, v in ours[key].items() if k != "pretrain_seed"} == {
            k: v for k, v in row.items() if k != "pretrain_seed"}  # fmt: skip
        # Which pretraining a run started from: its weights, not the benchmark's seed number.
        assert ours[key]["pretrain_seed"] == ("" if key[0] == "random" else _weights(
            benchmark_out / "pretrain" / "context_restoration"))  # fmt: skip
    report = (tmp_path / "c" / "report.md").read_text()
    seeds = len(theirs) // 4
    for part in ("# Comparison of fine-tuning runs: classify", "## What the numbers show",
                 "context_restoration vs random:", f"random: random weights in all {2 * seeds}",
                 f"context_restoration: all {2 * seeds} runs started from one pretraining",
                 "only the starting weights differ", "## Summary", "(reference)",
                 "![macro_f1 against label fraction](plot.png)", "## Per class: "
                 "context_restoration", "## Lost classes", "## Runs", "../bench/runs/random/"
                 "fraction_0.35/seed_0"):  # fmt: skip
        assert part in report, part
    assert "Caveat" not in report  # one machine
    assert (tmp_path / "c" / "plot.png").stat().st_size > 5000


def _weights(folder):
    return weights_fingerprint(load_checkpoint(folder)[0])


def test_compare_names_what_else_differs_and_counts_pretrainings_once(benchmark_out, tmp_path):
    copy = _copied_runs(benchmark_out, tmp_path) / "runs"
    pretrained = sorted((copy / "context_restoration" / "fraction_0.35").iterdir())
    arms = [f"cr={copy}/context_restoration/fraction_0.35/*",
            f"random={copy}/random/fraction_0.35/*"]  # fmt: skip
    # One run with another learning rate, one whose --init names the same weights from
    # another directory: still one pretraining.
    config = json.loads((pretrained[0] / "config.json").read_text())
    write_json(pretrained[0] / "config.json", {**config, "learning_rate": 0.5})
    metrics = json.loads((pretrained[1] / "metrics.json").read_text())
    write_json(pretrained[1] / "metrics.json", {**metrics, "init": "../elsewhere/pre"})
    report = api.compare(arm=arms, reference="random", out=tmp_path / "c1").report.read_text()
    assert f"cr: all {len(pretrained)} runs started from one pretraining" in report
    assert f"`../elsewhere/pre` (weights {metrics['init_weights']})" in report
    # The same folder name with other weights (pretrained again): a second pretraining.
    write_json(pretrained[1] / "metrics.json", {**metrics, "init_weights": "0" * 16})
    result = api.compare(arm=arms, reference="random", out=tmp_path / "c")
    report = result.report.read_text()
    assert "| setting | random | cr |" in report
    assert "| learning_rate | 0.001 | 0.001, 0.5 |" in report
    assert f"cr: {len(pretrained)} runs from 2 pretrainings" in report
    assert "(1 degrees of freedom)" in report
    # Each run's pretraining is its weights: the summary's intervals group pairs by them
    # (summarize's grouping is tested above).
    rows = _csv(result.results)
    assert {r["pretrain_seed"] for r in rows if r["method"] == "cr"} == {
        _weights(benchmark_out / "pretrain" / "context_restoration"), "0" * 16}  # fmt: skip
    # Runs that predate the fingerprint are grouped by their resolved --init folder.
    write_json(pretrained[1] / "metrics.json",
               {**{k: v for k, v in metrics.items() if k != "init_weights"},
                "init": str(tmp_path / "other")})  # fmt: skip
    older = _csv(api.compare(arm=arms, reference="random", out=tmp_path / "c2").results)
    assert str((tmp_path / "other").resolve()) in {r["pretrain_seed"] for r in older}
    by_seed = {(r["method"], r["seed"]): r for r in rows}
    seeds = sorted({seed for _, seed in by_seed}, key=int)
    expected = paired_difference(
        [float(by_seed["cr", s]["macro_f1"]) for s in seeds],
        [float(by_seed["random", s]["macro_f1"]) for s in seeds],
        groups=[by_seed["cr", s]["pretrain_seed"] for s in seeds])  # fmt: skip
    entry = next(row for row in result.summary_rows if row["method"] == "cr")
    assert (entry["diff_mean"], entry["diff_low"], entry["diff_high"]) == pytest.approx(
        expected[:3], nan_ok=True)  # fmt: skip


def test_compare_averages_several_pretrainings_within_each_seed(benchmark_out, tmp_path):
    """Every seed fine-tuned from each of two pretrainings, named as one initialisation: the
    statistics pair random with each seed's average of the two; results.csv keeps every run."""
    runs = _copied_runs(benchmark_out, tmp_path) / "runs"
    first = runs / "context_restoration" / "fraction_0.35"
    second = tmp_path / "second"
    shutil.copytree(first, second)
    for run in sorted(second.iterdir()):  # a second pretraining: other weights, other scores
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["init_weights"] = "1" * 16
        metrics["test"]["macro_f1"] = metrics["test"]["macro_f1"] / 2 + 0.3
        write_json(run / "metrics.json", metrics)
    arms = [f"random={runs}/random/fraction_0.35/*", f"cr={first}/*", f"cr={second}/*"]
    result = api.compare(arm=arms, reference="random", out=tmp_path / "averaged")

    def scores(folder):
        return {int(run.name.split("_")[1]): json.loads((run / "metrics.json").read_text())
                ["test"]["macro_f1"] for run in sorted(folder.iterdir())}  # fmt: skip

    a, b, random = scores(first), scores(second), scores(runs / "random" / "fraction_0.35")
    seeds = sorted(random)
    averaged = [(a[s] + b[s]) / 2 for s in seeds]
    expected = paired_difference(averaged, [random[s] for s in seeds])
    entry = next(row for row in result.summary_rows if row["method"] == "cr")
    assert entry["n"] == len(seeds) and entry["pairs"] == len(seeds)
    assert entry["mean"] == pytest.approx(sum(averaged) / len(seeds))
    assert (entry["diff_mean"], entry["diff_low"], entry["diff_high"]) == pytest.approx(
        expected[:3], nan_ok=True)  # fmt: skip
    rows = _csv(result.results)
    assert len([r for r in rows if r["method"] == "cr"]) == 2 * len(seeds)  # every run
    report = result.report.read_text()
    assert f"cr: {2 * len(seeds)} runs, every seed fine-tuned from each of 2 pretrainings" in report
    assert f"{3 * len(seeds)} runs of 2 initialisations" in report
    # A seed without a run from one of the pretrainings: its average would be of another thing.
    shutil.rmtree(second / f"seed_{seeds[-1]}")
    missing = rf"seed {seeds[-1]} has none from `.*context_restoration` \(weights 1{{16}}\)"
    _refused(tmp_path, arms, missing)
    # Two runs of one seed from the same weights are one run twice, not two pretrainings.
    shutil.rmtree(second)
    shutil.copytree(first, second)
    _refused(tmp_path, arms, r"both 'cr' at fraction 0.35, seed 0, from the same starting weights")


def _refused(tmp_path, arms, match, **options):
    with pytest.raises(CtxRestoreError, match=match):
        api.compare(arm=arms, out=tmp_path / "c", **options)
    assert not (tmp_path / "c").exists()  # nothing written before the checks


def test_compare_refuses_runs_it_cannot_pair(benchmark_out, tmp_path):
    runs = _copied_runs(benchmark_out, tmp_path) / "runs"
    random_runs, pretrained = runs / "random" / "fraction_0.35", runs / "context_restoration"
    one, two = pretrained / "fraction_0.35" / "seed_0", pretrained / "fraction_0.35" / "seed_1"
    arms = [f"random={random_runs}/*", f"cr={pretrained}/fraction_0.35/*"]
    _refused(tmp_path, [f"random={tmp_path}/x", f"cr={one}"], r"/x is not a folder")
    _refused(tmp_path, [f"random={random_runs}/*"], "at least two initialisations")
    _refused(tmp_path, ["random"], "expected NAME=RUNS")
    _refused(tmp_path, [f"a b={one}", f"c={two}"], "may hold only")
    _refused(tmp_path, [arms[0], f"cr={runs}/nothing*"], "no folder matches")
    _refused(tmp_path, [*arms, f"cr={one}"], r"seed_0 and .*seed_0 are both 'cr'")
    _refused(tmp_path, [*arms, f"other={one}"], r"seed_0 is named by two initialisations, 'cr'")
    _refused(tmp_path, arms, "--reference 'auto' is not among", reference="auto")
    _refused(tmp_path, arms, r"'dice' is not among the test metrics.*macro_f1", metric="dice")
    _refused(tmp_path, [arms[0], f"cr={benchmark_out / 'pretrain' / 'context_restoration'}"],
             "is not a fine-tuning run")  # fmt: skip
    split = json.loads((one / "split.json").read_text())
    split["cases"]["test"] = split["cases"]["test"][1:]
    write_json(one / "split.json", split)
    _refused(tmp_path, arms, r"seed_0 and .*seed_0 pair at fraction 0.35, seed 0, but their splits")
    metrics = json.loads((two / "metrics.json").read_text())
    write_json(two / "metrics.json", {**metrics, "task": "segment"})
    _refused(tmp_path, arms, r"2 tasks \(classify: .*segment: .*seed_1\)")
    (two / "metrics.json").unlink()
    _refused(tmp_path, arms, r"seed_1 is not a finished fine-tuning run: it has no metrics.json")
    result = runner.invoke(app, ["compare", "--arm", arms[0], "--arm", arms[1], "--out",
                                 str(tmp_path / "c")])  # fmt: skip
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


def test_more_seeds_extend_a_finished_benchmark(benchmark_out):
    """Runs after the module's other tests on benchmark_out: only the new seed trains."""
    before = _finished(benchmark_out)
    result = api.benchmark(out=benchmark_out, **{**TINY, "seeds": 3})
    assert result.runs == 2 * 2 * 3 and result.trained == 2 * 2 and result.skipped == 8
    assert {path: _finished(benchmark_out)[path] for path in before} == before
    assert json.loads((benchmark_out / "benchmark.json").read_text())["seeds"] == 3
    assert all(row["n"] == 3 for row in result.summary_rows)


def test_more_methods_and_fractions_extend_a_benchmark_and_fewer_are_refused(tmp_path):
    first = {**TINY, "methods": "random", "fractions": "1.0", "seeds": 1}
    api.benchmark(out=tmp_path / "out", **first)
    before = _finished(tmp_path / "out")
    grown = {**first, "methods": "random,context_restoration", "fractions": "0.35,1.0"}
    result = api.benchmark(out=tmp_path / "out", **grown)
    assert (result.runs, result.trained, result.skipped) == (4, 3, 1)
    assert {path: _finished(tmp_path / "out")[path] for path in before} == before
    saved = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert (saved["methods"], saved["fractions"]) == (["random", "context_restoration"],
                                                      "0.35,1.0")  # fmt: skip
    # Dropping a method or a fraction would leave finished runs out of the table.
    with pytest.raises(CtxRestoreError, match=r"methods: \['random', 'context_restoration'\]"):
        api.benchmark(out=tmp_path / "out", **{**grown, "methods": "context_restoration"})
    with pytest.raises(CtxRestoreError, match=r"fractions: '0.35,1.0' -> '1.0'"):
        api.benchmark(out=tmp_path / "out", **{**grown, "fractions": "1.0"})


def test_each_seed_fine_tunes_from_its_own_pretraining_with_pretrain_seeds(tmp_path, monkeypatch):
    options = {**TINY, "fractions": "1.0", "seeds": 3, "pretrain_seeds": 2}
    result = api.benchmark(out=tmp_path / "out", **options)
    assert (result.runs, result.trained) == (6, 6)
    pretrain = tmp_path / "out" / "pretrain" / "context_restoration"
    configs = [json.loads((pretrain / f"seed_{k}" / "config.json").read_text()) for k in (0, 1)]
    assert [config["seed"] for config in configs] == [0, 1]
    weights = [load_file(pretrain / f"seed_{k}" / "model.safetensors") for k in (0, 1)]
    assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    runs = tmp_path / "out" / "runs"
    inits = [json.loads((runs / f"context_restoration/fraction_1.0/seed_{s}/config.json")
                        .read_text())["init"] for s in range(3)]  # fmt: skip
    assert [Path(init).relative_to(pretrain).as_posix() for init in inits] == [
        "seed_0",
        "seed_1",
        "seed_0",
    ]  # fine-tuning seed s: pretraining s mod 2
    with (tmp_path / "out" / "results.csv").open() as handle:
        started = {(r["method"], r["seed"]): r["pretrain_seed"] for r in csv.DictReader(handle)}
    assert started == {("random", "0"): "", ("random", "1"): "", ("random", "2"): "",
                       ("context_restoration", "0"): "0", ("context_restoration", "1"): "1",
                       ("context_restoration", "2"): "0"}  # fmt: skip
    report = result.report.read_text()
    assert "pretrained 2 times and fine-tuning seed s started from pretraining s mod 2" in report
    assert "the paired intervals are over the 2 pretrainings" in report
    assert "](pretrain/context_restoration/seed_1/report.md) | 1 |" in report
    assert "| 1.0: " in report and "(2 runs) |" in report and "(1 run) |" in report
    # Each pretraining's linear probe, on seed 0's split, beside its transfer.
    with (tmp_path / "out" / "probe" / "context_restoration" / "probe.csv").open() as handle:
        probed = list(csv.DictReader(handle))
    assert [Path(row["init"]).name for row in probed] == ["seed_0", "seed_1"]
    assert "| linear probe before fine-tuning | its fine-tunes against random" in report
    for draw, row in enumerate(probed):
        cells = next(line for line in report.splitlines()
                     if f"seed_{draw}/report.md) | {draw} |" in line).split(" | ")  # fmt: skip
        assert cells[-2] == f"{float(row['balanced_accuracy']):.3g}"
    assert "on the split of seed 0 at fraction 1.0, scored on its validation images" in report
    assert not (tmp_path / "out" / "probe" / "random").exists()  # nothing pretrained to probe
    # Resumed with everything finished, the report reuses the probes of the same weights ...
    record = tmp_path / "out" / "probe" / "context_restoration" / "probe.json"
    probes, run_probe = [], benchmark_module.run_probe
    monkeypatch.setattr(benchmark_module, "run_probe",
                        lambda config: probes.append(config) or run_probe(config))  # fmt: skip
    assert api.benchmark(out=tmp_path / "out", **options).report.read_text() == report
    assert probes == []
    # ... and probes again when a pretraining's weights are not the ones probed.
    stored = json.loads(record.read_text())
    fingerprint, stored["rows"][1]["init_weights"] = stored["rows"][1]["init_weights"], "0" * 16
    record.write_text(json.dumps(stored))
    assert api.benchmark(out=tmp_path / "out", **options).report.read_text() == report
    assert [[Path(init).name for init in config.init] for config in probes] == [
        ["seed_0", "seed_1"]]  # fmt: skip
    assert json.loads(record.read_text())["rows"][1]["init_weights"] == fingerprint
    # The pairing of finished runs depends on it: another count in the same OUT is refused.
    with pytest.raises(CtxRestoreError, match=r"pretrain_seeds: 2 -> 3"):
        api.benchmark(out=tmp_path / "out", **{**options, "pretrain_seeds": 3})


TWO_STAGES = "context_restoration_then_dense_contrastive"


def test_two_stage_methods_come_after_their_first_stage_and_need_it():
    assert parse_methods(f"{TWO_STAGES},dense_contrastive,random,context_restoration") == (
        "random", "context_restoration", "dense_contrastive", TWO_STAGES)  # fmt: skip
    with pytest.raises(CtxRestoreError, match=f"method {TWO_STAGES} continues "
                       "context_restoration's pretraining; add context_restoration"):  # fmt: skip
        parse_methods(f"random,{TWO_STAGES}")
    for bad in ("random_then_dense_contrastive", "context_restoration_then_",
                "context_restoration_then_dense_contrastive_then_autoencoder"):  # fmt: skip
        with pytest.raises(CtxRestoreError, match=rf"unknown method\(s\) {bad}; .*FIRST_then"):
            parse_methods(f"random,context_restoration,{bad}")


def test_a_second_stage_with_nothing_after_the_encoder_is_refused_before_training(tmp_path):
    methods = "random,context_restoration,context_restoration_then_relative_position"
    with pytest.raises(
        CtxRestoreError,
        match="initialisation context_restoration, then "
        r"relative_position \(encoder fixed\): freeze_encoder: relative_posi",
    ):
        api.benchmark(out=tmp_path / "out", **{**TINY, "methods": methods, "image_size": 64})
    assert not (tmp_path / "out" / "pretrain").exists()


def test_a_two_stage_arm_trains_the_second_pretext_over_each_first_stage_encoder(tmp_path):
    options = {**TINY, "task": "segment", "fractions": "1.0", "seeds": 2, "pretrain_seeds": 2,
               "methods": f"random,context_restoration,{TWO_STAGES}"}  # fmt: skip
    result = api.benchmark(out=tmp_path / "out", **options)
    assert (result.runs, result.trained) == (6, 6)
    pretrain = tmp_path / "out" / "pretrain"
    for seed in (0, 1):  # second-stage seed k starts from first-stage seed k
        first = load_file(pretrain / "context_restoration" / f"seed_{seed}" / "model.safetensors")
        second = load_file(pretrain / TWO_STAGES / f"seed_{seed}" / "model.safetensors")
        spec = json.loads((pretrain / TWO_STAGES / f"seed_{seed}" / "spec.json").read_text())
        assert spec["pretext"]["name"] == "dense_contrastive"
        assert spec["init"]["folder"] == str(pretrain / "context_restoration" / f"seed_{seed}")
        assert spec["init"]["frozen"] == ["encoder"]
        encoder = [name for name in first if name.startswith("encoder.")]
        assert encoder and all(torch.equal(first[name], second[name]) for name in encoder)
        decoder = [name for name in first if name.startswith("decoder.") and "weight" in name]
        assert not all(torch.equal(first[name], second[name]) for name in decoder)
    run = tmp_path / "out" / "runs" / TWO_STAGES / "fraction_1.0" / "seed_1"
    assert json.loads((run / "config.json").read_text())["init"] == str(pretrain / TWO_STAGES /
                                                                        "seed_1")  # fmt: skip
    report = result.report.read_text()
    title = "context_restoration, then dense_contrastive (encoder fixed)"
    assert f"- {title} vs random: " in report
    assert ("Each two-stage initialisation against its first stage alone (what the second "
            f"stage adds):\n\n- {title} vs context_restoration: ") in report  # fmt: skip
    assert ("Two-stage initialisations had twice the pretraining budget (2 steps, then 2 more "
            f"with the encoder fixed): {title} started from context_restoration's "
            "pretraining.") in report  # fmt: skip
    assert f"[{title}](pretrain/{TWO_STAGES}/seed_1/report.md) | 1 |" in report


def test_one_pretraining_per_seed_is_said_to_cover_pretraining_variance(tmp_path):
    options = {**TINY, "fractions": "1.0", "seeds": 2, "pretrain_seeds": 2}
    report = api.benchmark(out=tmp_path / "out", **options).report.read_text()
    assert (
        "one pretraining per fine-tuning seed, so the intervals cover the variation of "
        "pretraining as well" in report
    )


def test_frozen_feature_evaluation_freezes_every_encoder_random_included(tmp_path):
    result = api.benchmark(out=tmp_path / "out", **{**TINY, "fractions": "1.0", "seeds": 1,
                                                    "freeze_encoder": True})  # fmt: skip
    runs = tmp_path / "out" / "runs"
    for method in ("random", "context_restoration"):
        run = runs / method / "fraction_1.0" / "seed_0"
        assert json.loads((run / "config.json").read_text())["freeze_encoder"] is True
        after = load_file(run / "model.safetensors")
        if method == "random":  # the encoder keeps the seed's random weights
            torch.manual_seed(0)
            before = build_model(json.loads((run / "spec.json").read_text())["model"]).state_dict()
        else:
            before = load_file(tmp_path / "out" / "pretrain" / method / "model.safetensors")
        encoder = [n for n in after if n.startswith("encoder.") and "num_batches" not in n]
        if method == "random":  # normalisation statistics estimated once, from training images
            statistics = [n for n in encoder if ".running_" in n]
            assert statistics and all(not torch.equal(before[n], after[n]) for n in statistics)
            encoder = [n for n in encoder if n not in statistics]
        assert encoder and all(torch.equal(before[n], after[n]) for n in encoder), method
        if method == "random":  # and the rest did train
            rest = [n for n in after if not n.startswith("encoder.") and "num_batches" not in n]
            assert rest and any(not torch.equal(before[n], after[n]) for n in rest)
    assert "Frozen-feature evaluation" in result.report.read_text()


def test_transfer_stages_and_head_only_steps_reach_the_pretrained_runs_only(tmp_path):
    api.benchmark(out=tmp_path / "out", **{**TINY, "fractions": "1.0", "seeds": 1,
                                           "transfer_stages": 1, "head_only_steps": 1})  # fmt: skip
    runs = tmp_path / "out" / "runs"
    pretrained = json.loads(
        (runs / "context_restoration/fraction_1.0/seed_0/config.json").read_text()
    )
    random = json.loads((runs / "random/fraction_1.0/seed_0/config.json").read_text())
    assert (pretrained["transfer_stages"], random["transfer_stages"]) == (1, None)
    assert (pretrained["head_only_steps"], random["head_only_steps"]) == (1, 0)
    metrics = json.loads(
        (runs / "context_restoration/fraction_1.0/seed_0/metrics.json").read_text()
    )
    assert metrics["transfer"]["prefixes"] == ["encoder.stages.0."]
    assert json.loads((tmp_path / "out" / "benchmark.json").read_text())["transfer_stages"] == 1


def test_fresh_decoder_levels_reach_the_pretrained_runs_only(tmp_path):
    api.benchmark(out=tmp_path / "out", **{**TINY, "task": "segment", "fractions": "1.0",
                                           "seeds": 1, "fresh_decoder_levels": 1})  # fmt: skip
    runs = tmp_path / "out" / "runs"
    pretrained = runs / "context_restoration/fraction_1.0/seed_0"
    random = json.loads((runs / "random/fraction_1.0/seed_0/config.json").read_text())
    config = json.loads((pretrained / "config.json").read_text())
    assert (config["fresh_decoder_levels"], random["fresh_decoder_levels"]) == (1, 0)
    prefixes = json.loads((pretrained / "metrics.json").read_text())["transfer"]["prefixes"]
    assert prefixes[0] == "encoder." and prefixes[1:] == [
        f"decoder.levels.{i}." for i in range(len(prefixes) - 1)
    ]
    assert len(prefixes) > 1  # the deeper decoder levels did transfer


def test_relative_position_patches_keep_a_quarter_of_the_image():
    assert method_options("relative_position", 64) == {"patch_size": 16}
    assert method_options("relative_position", 128) == {"patch_size": 32}
    assert method_options("relative_position", 96) == {"patch_size": 16}  # multiples of 16
    assert method_options("relative_position", 256) == {"patch_size": 64}
    assert method_options("relative_position", 32) == {"patch_size": 16}  # the smallest
    assert method_options("context_restoration", 128) == {}  # takes --patch-size


def test_the_restoration_loss_reaches_the_restoration_pretexts_only(tmp_path):
    settings = {key: value for key, value in TINY.items() if key != "methods"}
    options = BenchmarkOptions(**{**settings, "image_size": 64,
                                  "restoration_loss": "l1_gradient"}, out=tmp_path)  # fmt: skip
    arms = tuple(Arm(m, {"method": m, **method_options(m, 64)}) for m in list_pretexts())
    protocol = build_protocol(options, "benchmark", arms, {})
    losses = {arm.name: protocol.pretrain_config(arm).restoration_loss for arm in arms}
    assert losses == {"context_restoration": "l1_gradient", "autoencoder": "l1_gradient",
                      "models_genesis": "l1_gradient", "context_encoder": "mse",
                      "relative_position": "mse", "contrastive": "mse",
                      "context_restoration_contrastive": "l1_gradient",
                      "context_restoration_dense": "l1_gradient",
                      "dense_contrastive": "mse"}  # fmt: skip
    assert protocol.settings["restoration_loss"] == "l1_gradient"


@pytest.mark.parametrize(
    ("option", "value"),
    [("projector", "none"), ("dense_views", "clean"), ("dense_level", 1),
     ("contrastive_weight", 10.0), ("placement", "poisson_disc")],
)  # fmt: skip
def test_a_pretext_specific_option_reaches_the_pretexts_that_take_it_only(tmp_path, option, value):
    settings = {key: value for key, value in TINY.items() if key != "methods"}
    options = BenchmarkOptions(**{**settings, "image_size": 64, option: value}, out=tmp_path)
    arms = tuple(Arm(m, {"method": m, **method_options(m, 64)}) for m in list_pretexts())
    protocol = build_protocol(options, "benchmark", arms, {})
    given = {arm.name: getattr(protocol.pretrain_config(arm), option) for arm in arms}
    taking = {
        "projector": {"dense_contrastive", "context_restoration_dense"},
        "dense_level": {"dense_contrastive", "context_restoration_dense"},
        "dense_views": {"context_restoration_dense"},
        "contrastive_weight": {"context_restoration_contrastive", "context_restoration_dense"},
        "placement": {"context_restoration", "context_restoration_contrastive",
                      "context_restoration_dense"},
    }[option]  # fmt: skip
    assert given == {m: value if m in taking else None for m in list_pretexts()}
    assert protocol.settings[option] == value
    default = build_protocol(dataclasses.replace(options, **{option: None}), "benchmark", arms, {})
    assert all(getattr(default.pretrain_config(arm), option) is None for arm in arms)


def test_a_pretraining_network_with_the_tasks_encoder_is_compared_with_random(tmp_path):
    # sononet_unet pretrains the classifier's own encoder (under another decoder): random
    # weights build the same architecture, so the comparison is allowed; a U-Net's is refused.
    settings = {key: value for key, value in TINY.items() if key != "methods"}
    arms = (Arm("random"), Arm("context_restoration", {"method": "context_restoration"}))
    options = BenchmarkOptions(**{**settings, "network": "sononet_unet"}, out=tmp_path)
    protocol = build_protocol(options, "benchmark", arms, {})
    assert protocol.pretrain_config(arms[1]).network == "sononet_unet"
    with pytest.raises(CtxRestoreError, match="random initialisation builds the classify"):
        build_protocol(dataclasses.replace(options, network="unet"), "benchmark", arms, {})


@pytest.mark.parametrize("box_head", ["mask", "segment"])
def test_the_unet_box_heads_pretrain_a_sononet_unet_by_default(tmp_path, box_head):
    settings = {key: value for key, value in TINY.items() if key != "methods"}
    arms = (Arm("random"), Arm("context_restoration", {"method": "context_restoration"}))
    options = BenchmarkOptions(**{**settings, "task": "localize", "box_head": box_head},
                               out=tmp_path)  # fmt: skip
    protocol = build_protocol(options, "benchmark", arms, {})
    assert protocol.pretrain_config(arms[1]).network == "sononet_unet"
    assert protocol.finetune_config(arms[0], "1.0", 0).box_head == box_head
    assert protocol.settings["box_head"] == box_head
    regression = dataclasses.replace(options, box_head="regression")
    assert build_protocol(regression, "benchmark", arms, {}).pretrain_config(arms[1]).network == (
        "sononet"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"restoration_loss": "huber"}, "unknown restoration loss 'huber'"),
        ({"box_head": "mask"}, "--box-head mask is a localisation option"),
        ({"methods": "random,nope"}, "unknown method.*nope.*context_restoration"),
        ({"fractions": "0.1,10%"}, "same fraction twice"),
        ({"fractions": "0.1,2.5"}, "label fraction '2.5' is not valid"),
        ({"patch_size": 24}, "initialisation context_restoration: .*does not fit"),
        ({"network": "unet"}, "random initialisation builds"),
        ({"patience": -1}, r"patience must be >= 0 validations \(0: never stop early\), got -1"),
        ({"pretrain_seeds": 3}, r"pretrain_seeds 3 is more than the 2 fine-tuning seeds"),
        ({"pretrain_seeds": 0}, r"pretrain_seeds must be >= 1, got 0"),
        ({"freeze_encoder": True, "transfer_stages": 1}, "choose one"),
        (
            {"task": "segment", "fresh_decoder_levels": 1, "transfer_stages": 1},
            "whole decoder starts random",
        ),
        ({"fresh_decoder_levels": -1}, "fresh_decoder_levels must be >= 0, got -1"),
        ({"fresh_decoder_levels": 1}, "the classify network has no decoder"),
        ({"freeze_encoder": True, "head_only_steps": 1}, "never trains; choose one"),
        ({"head_only_steps": 2}, "head_only_steps 2 is not shorter than max_steps 2"),
        ({"head_only_steps": -1}, "head_only_steps must be >= 0, got -1"),
        ({"projector": "linear"}, r"projector must be one of \('mlp', 'none'\), got 'linear'"),
        ({"placement": "grid"}, "unknown placement 'grid'; placements: uniform, poisson_disc"),
        (
            {"projector": "none"},
            "projector is for context_restoration_dense, dense_contrastive, and --methods names "
            "none of them",
        ),
        (
            {"dense_views": "clean"},
            "dense_views is for context_restoration_dense, and --methods names none of them",
        ),
        (
            {"methods": "random,context_restoration_dense", "dense_views": "blurred"},
            r"dense_views must be one of \('corrupted', 'clean'\), got 'blurred'",
        ),
        (
            {"methods": "random,dense_contrastive", "network": "sononet_unet", "dense_level": 9},
            r"dense level 9 is out of range: this network's decoder has 4 levels",
        ),
    ],
)
def test_benchmark_checks_options_before_training(tmp_path, change, message):
    with pytest.raises(CtxRestoreError, match=message):
        api.benchmark(out=tmp_path / "out", **{**TINY, **change})
    assert not (tmp_path / "out" / "runs").exists()


def test_ablation_on_a_tiny_grid_writes_its_report(tmp_path):
    options = {key: value for key, value in TINY.items() if key not in
               ("methods", "patch_size", "num_swaps", "fractions", "seeds")}  # fmt: skip
    result = api.ablate(out=tmp_path / "ablation", patch_sizes="4", num_swaps="5",
                        placements="uniform,foreground,poisson_disc", fractions="0.5", seeds=1,
                        **options)  # fmt: skip
    assert [row["method"] for row in result.summary_rows] == [
        "random",
        "default",
        "placement_foreground",
        "placement_poisson_disc",
    ]
    pretrained = tmp_path / "ablation" / "pretrain"
    arms = ("default", "placement_foreground", "placement_poisson_disc")
    configs = {arm: json.loads((pretrained / arm / "config.json").read_text()) for arm in arms}
    assert {arm: (config["foreground_threshold"], config["placement"])
            for arm, config in configs.items()} == {
        "default": (None, None), "placement_foreground": (0.0, None),
        "placement_poisson_disc": (None, "poisson_disc")}  # fmt: skip
    spec = json.loads((pretrained / "placement_poisson_disc" / "spec.json").read_text())
    assert spec["pretext"]["params"]["placement"] == "poisson_disc"
    report = result.report.read_text()
    for part in ("# Ablation of context restoration: classify",
                 "Each setting against the default:", "foreground placement vs default",
                 "poisson_disc placement vs default",
                 "default (patch 4, T 5, uniform)", "too few paired runs to tell (1)",
                 "## Summary", "plot.png"):  # fmt: skip
        assert part in report, part
    assert result.plot.stat().st_size > 5000


def test_an_ablation_grows_a_longer_random_control_and_reads_it(tmp_path):
    options = {key: value for key, value in TINY.items() if key not in
               ("methods", "patch_size", "num_swaps", "fractions", "seeds")}  # fmt: skip
    ablation = dict(out=tmp_path / "ablation", patch_sizes="4,6", num_swaps="5",
                    placements="uniform", fractions="1.0", seeds=1, **options)  # fmt: skip
    api.ablate(**ablation)
    result = api.ablate(**ablation, controls="random_x3")
    assert (result.runs, result.trained, result.skipped) == (4, 1, 3)  # only the control trains
    assert [row["method"] for row in result.summary_rows] == [
        "random", "random_x3", "default", "patch_size_6"]  # fmt: skip
    config = tmp_path / "ablation" / "runs" / "random_x3" / "fraction_1.0" / "seed_0"
    assert json.loads((config / "config.json").read_text())["max_steps"] == 3 * TINY["max_steps"]
    report = result.report.read_text()
    assert "default (patch 4, T 5, uniform) vs random, 3x schedule:" in report
    settings_part = report.split("Each setting against the default:")[1].split("## Summary")[0]
    assert "patch 6" in settings_part and "3x schedule" not in settings_part
    with pytest.raises(CtxRestoreError, match=r"controls: \['random_x3'\] -> None"):
        api.ablate(**ablation)  # dropping the control would leave its runs out
    with pytest.raises(CtxRestoreError, match=r"unknown control.*random_x1"):
        api.ablate(**{**ablation, "out": tmp_path / "other"}, controls="random_x1")


def test_an_ablation_compares_pretraining_lengths_and_grows_them(tmp_path):
    options = {key: value for key, value in TINY.items() if key not in
               ("methods", "patch_size", "num_swaps", "fractions", "seeds")}  # fmt: skip
    ablation = dict(out=tmp_path / "ablation", patch_sizes="4", num_swaps="5",
                    placements="uniform", fractions="1.0", seeds=1, **options)  # fmt: skip
    api.ablate(**ablation, pretrain_lengths="4")
    result = api.ablate(**ablation, pretrain_lengths="6,4")
    assert (result.runs, result.trained, result.skipped) == (4, 1, 3)  # only the 6-step arm
    assert [row["method"] for row in result.summary_rows] == [
        "random", "default", "pretrain_steps_4", "pretrain_steps_6"]  # fmt: skip
    for arm, steps in (("default", 2), ("pretrain_steps_4", 4), ("pretrain_steps_6", 6)):
        metrics = json.loads((tmp_path / "ablation" / "pretrain" / arm / "metrics.json")
                             .read_text())  # fmt: skip
        assert metrics["steps"] == steps, arm
        config = json.loads((tmp_path / "ablation" / "pretrain" / arm / "config.json")
                            .read_text())  # fmt: skip
        assert (config["patch_size"], config["num_swaps"]) == (4, 5)  # only the length varies
    report = result.report.read_text()
    settings_part = report.split("Each setting against the default:")[1].split("## Summary")[0]
    assert "pretrained 4 steps vs default" in settings_part
    assert "pretrained 6 steps vs default" in settings_part
    with pytest.raises(CtxRestoreError, match=r"pretrain_lengths: \[.*\] -> None"):
        api.ablate(**ablation)  # dropping the lengths would leave their runs out
    with pytest.raises(CtxRestoreError, match=r"repeats --pretrain-steps 2"):
        api.ablate(**{**ablation, "out": tmp_path / "other"}, pretrain_lengths="2,8")
    assert not (tmp_path / "other").exists()


def test_every_arm_runs_the_whole_schedule_by_default(tmp_path, monkeypatch):
    # Validation only gets worse after the first: with early stopping (patience 1) each run
    # would stop at its second validation; the benchmark's default runs every step.
    from ctxrestore.tasks.classify import ClassificationTask

    scores = iter([0.9 - 0.01 * i for i in range(1000)])
    monkeypatch.setattr(ClassificationTask, "evaluate", lambda *args: {"macro_f1": next(scores)})
    api.benchmark(out=tmp_path / "out", **{**TINY, "fractions": "1.0", "seeds": 1,
                                           "max_steps": 60})  # fmt: skip
    for method in ("random", "context_restoration"):
        run = tmp_path / "out" / "runs" / method / "fraction_1.0" / "seed_0"
        assert json.loads((run / "config.json").read_text())["patience"] == 0
        metrics = json.loads((run / "metrics.json").read_text())
        assert (metrics["steps"], metrics["best_step"], metrics["stopped_early"]) == (60, 20, False)


def test_a_benchmark_from_before_the_pretext_specific_options_continues_with_their_defaults(
    tmp_path,
):
    settings = {"task": "classify", "seeds": 2, **LATER_OPTIONS}
    new = ("projector", "dense_views", "dense_level", "contrastive_weight", "placement")
    assert all(settings[key] is None for key in new)
    older = {key: value for key, value in settings.items() if key not in new}
    (tmp_path / "benchmark.json").write_text(json.dumps(older))
    check_settings(tmp_path, settings)  # they ran with each pretext's default
    with pytest.raises(CtxRestoreError, match=r"dense_level: None -> 1"):
        check_settings(tmp_path, {**settings, "dense_level": 1})

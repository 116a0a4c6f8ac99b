"""report.md of a benchmark or an ablation: what the numbers show, in words generated from
them (best initialisation per fraction, each against random with the 95% interval of the
paired difference), the summary table, the plot, the difference per class, the pretraining
runs and the settings."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ctxrestore.bench.protocol import Protocol, pretrainings
from ctxrestore.bench.stats import PairedDifference, higher_is_better
from ctxrestore.bench.summary import (
    class_metrics,
    compare,
    interval,
    markdown_table,
    number,
    pretraining_of,
)
from ctxrestore.data.splits import parse_fraction
from ctxrestore.engine.run_folder import METRICS_FILE
from ctxrestore.files import atomic_write, read_json

CONTEXT_RESTORATION = "context_restoration"
DEFAULT_SETTING = "default"  # the centre arm of an ablation
# Per task, the per-class metric that is 0 when a run never got a class right: an organ
# never detected, a class never overlapped, a plane never classified right. A mean over seeds
# hides such a failure (docs/experiments.md 32: a quarter of the mask head's runs lost one).
LOST_CLASS_FAMILIES = {"localize": "detection_rate", "segment": "global_dice", "classify": "f1"}
FOCUS_TITLES = {"benchmark": "Context restoration, the paper's method",
                "ablation": "Context restoration at its default setting"}  # fmt: skip


def verdict(difference: PairedDifference, metric: str) -> str:
    """'better', 'worse' or 'no clear difference' by the 95% interval of a - b; or why not."""
    if difference.n < 2 or not (math.isfinite(difference.low) and math.isfinite(difference.high)):
        return f"too few paired runs to tell ({difference.n})"
    above, below = difference.low > 0, difference.high < 0
    if higher_is_better(metric):
        return "better" if above else "worse" if below else "no clear difference"
    return "better" if below else "worse" if above else "no clear difference"


def _difference_text(difference: PairedDifference) -> str:
    spread = interval(difference.mean, difference.low, difference.high, signed=True)
    return f"{spread}, better in {difference.wins}/{difference.n} seeds"


def _ranked(summary: Sequence[dict], fraction: str, metric: str) -> list[dict]:
    entries = [e for e in summary if e["fraction"] == fraction and math.isfinite(e["mean"])]
    return sorted(entries, key=lambda e: e["mean"], reverse=higher_is_better(metric))


def best_per_fraction(
    protocol: Protocol, rows: Sequence[dict], summary: Sequence[dict]
) -> list[str]:
    metric, lines = protocol.metric, []
    for fraction in protocol.fractions:
        ranked = _ranked(summary, fraction, metric)
        if not ranked:
            lines.append(f"- Fraction {fraction}: no finite {metric} in any run.")
            continue
        best = ranked[0]
        text = (f"- Fraction {fraction}: best mean {metric} is "
                f"**{protocol.arm(best['method']).title}** ({number(best['mean'])})")  # fmt: skip
        if len(ranked) > 1:
            second = ranked[1]
            difference = compare(rows, metric, best["method"], second["method"], fraction)
            if second["mean"] == best["mean"]:
                standing = "tied with"
            elif verdict(difference, metric) == "better":
                standing = "clearly ahead of"
            else:
                standing = "not clearly ahead of"
            text += (
                f"; {standing} {protocol.arm(second['method']).title} "
                f"({number(second['mean'])}; paired difference {_difference_text(difference)})"
            )
        lines.append(text + ".")
    return lines


def best_section(protocol: Protocol, rows: Sequence[dict], summary: Sequence[dict]) -> list[str]:
    """The report's opening: the best initialisation at each fraction, against the next."""
    return ["## What the numbers show", "", "Best initialisation at each fraction:", "",
            *best_per_fraction(protocol, rows, summary), ""]  # fmt: skip


def against(
    protocol: Protocol, rows: Sequence[dict], method: str, reference: str
) -> dict[str, tuple[str, PairedDifference]]:
    """fraction -> (verdict, paired difference) of method - reference."""
    result = {}
    for fraction in protocol.fractions:
        difference = compare(rows, protocol.metric, method, reference, fraction)
        result[fraction] = (verdict(difference, protocol.metric), difference)
    return result


def comparison_lines(
    protocol: Protocol, rows: Sequence[dict], reference: str, methods: Sequence[str]
) -> list[str]:
    """One line per method: at which fractions it is better / worse / not clearly different."""
    lines = []
    for method in methods:
        parts = [
            f"{verdict_text} at {fraction} ({_difference_text(difference)})"
            for fraction, (verdict_text, difference) in against(
                protocol, rows, method, reference
            ).items()
        ]
        lines.append(f"- {protocol.arm(method).title} vs {reference}: " + "; ".join(parts) + ".")
    return lines


def _full_fraction(fractions: Sequence[str]) -> str | None:
    return next((f for f in fractions if parse_fraction(f) == 1.0), None)


def focus_lines(
    protocol: Protocol, rows: Sequence[dict], summary: Sequence[dict], focus: str
) -> list[str]:
    """The questions the method has to answer: does it beat random with the interval above
    zero, is it worse than random with all labels, is it at least as good as the others."""
    title, reference, lines = protocol.arm(focus).title, protocol.reference, []
    side = "above zero" if higher_is_better(protocol.metric) else "below zero (lower)"
    if reference in {arm.name for arm in protocol.arms}:
        verdicts = against(protocol, rows, focus, reference)
        wins = [f for f, (v, _) in verdicts.items() if v == "better"]
        rest = [f for f, (v, _) in verdicts.items() if v != "better"]
        if wins:
            lines.append(
                f"- {title} beats {reference} with the 95% interval of the paired difference "
                f"{side} at fraction(s) {', '.join(wins)}"
                + (f", but not at {', '.join(rest)}." if rest else ".")
            )
        else:
            lines.append(
                f"- {title} does not beat {reference} with the 95% interval of the paired "
                f"difference {side} at any fraction."
            )
        full = _full_fraction(protocol.fractions)
        if full is not None:
            state, difference = verdicts[full]
            worse = "worse" if state == "worse" else "not worse"
            lines.append(
                f"- With all labels (fraction {full}) it is {worse} than {reference} by the 95% "
                f"interval: {_difference_text(difference)}."
            )
    for control in _longer_controls(protocol):
        lines += _head_start_lines(protocol, rows, focus, control)
    others = [arm.name for arm in protocol.arms
              if arm.name not in (focus, reference) and arm.pretrain is not None]  # fmt: skip
    if others:
        lines.append(_rank_among_pretrained(protocol, summary, focus, others))
    return lines


def _longer_controls(protocol: Protocol) -> list[str]:
    """Arms of random weights fine-tuned longer than the shared schedule (random_xK)."""
    return [arm.name for arm in protocol.arms
            if arm.pretrain is None and arm.schedule_factor > 1]  # fmt: skip


def _head_start_lines(
    protocol: Protocol, rows: Sequence[dict], focus: str, control: str
) -> list[str]:
    """Is the shared schedule long enough for random weights, and does the focus arm's gain
    survive when they get a longer one? A gain that does not is a head start."""
    title, control_title = protocol.arm(focus).title, protocol.arm(control).title
    lines = []
    if protocol.reference in {arm.name for arm in protocol.arms}:
        gains = [f for f, (v, _) in against(protocol, rows, control, protocol.reference).items()
                 if v == "better"]  # fmt: skip
        if gains:
            lines.append(
                f"- Random weights get better with the longer schedule ({control_title}) at "
                f"fraction(s) {', '.join(gains)}: the shared schedule under-trains them there, "
                "so a gain over random at those fractions may be a head start."
            )
    parts = [f"{v} at {fraction} ({_difference_text(d)})"
             for fraction, (v, d) in against(protocol, rows, focus, control).items()]  # fmt: skip
    lines.append(
        f"- {title} vs {control_title}: " + "; ".join(parts) + ". Where a gain over random "
        "is gone here, the pretrained network reached sooner what random weights reach with "
        "more steps: a head start, not a better end point."
    )
    return lines


def _rank_among_pretrained(
    protocol: Protocol, summary: Sequence[dict], focus: str, others: Sequence[str]
) -> str:
    """Whether `focus` has the best mean among the pretrained initialisations everywhere."""
    metric, behind = protocol.metric, []
    sign = 1 if higher_is_better(metric) else -1
    for fraction in protocol.fractions:
        means = {e["method"]: e["mean"] for e in _ranked(summary, fraction, metric)}
        if focus not in means:
            continue
        ahead = [m for m in others if m in means and sign * (means[m] - means[focus]) > 0]
        titles = [protocol.arm(method).title for method in ahead]
        if titles:
            behind.append(f"{fraction} (behind {', '.join(titles)})")
    if behind:
        return (f"- Its mean {metric} is not the best among the pretrained initialisations at "
                f"fraction(s) {'; '.join(behind)}.")  # fmt: skip
    return (f"- Its mean {metric} is at least as good as every other pretrained "
            "initialisation at every fraction.")  # fmt: skip


def _transfer_of(
    protocol: Protocol, rows: Sequence[dict], arm_name: str, pretrain_seed: int, reference: str
) -> str:
    """The mean paired difference from `reference` of the runs that started from one
    pretraining, per fraction: which pretraining transferred well, which did not."""
    own = [row for row in rows if row["method"] != arm_name
           or pretraining_of(row) == str(pretrain_seed)]  # fmt: skip
    parts = []
    for fraction in protocol.fractions:
        difference = compare(own, protocol.metric, arm_name, reference, fraction)
        if difference.n:
            runs = "run" if difference.n == 1 else "runs"
            parts.append(f"{fraction}: {number(difference.mean, signed=True)} "
                         f"({difference.n} {runs})")  # fmt: skip
    return "; ".join(parts) or "no paired run yet"


def pretraining_lines(
    protocol: Protocol,
    rows: Sequence[dict] = (),
    reference: str | None = None,
    probes: dict[tuple[str, int], float] | None = None,
) -> list[str]:
    """The pretraining runs; with several per initialisation, each one's transfer (its
    fine-tunes against `reference`): restoring as well does not mean transferring as well;
    and with `probes`, each one's linear probe (benchmark.probe_pretrainings)."""
    transfer = protocol.pretrain_seeds > 1 and reference is not None
    header = (
        "| initialisation | seed | steps | final loss | what the pretext's held-out metrics show |"
    )
    rule = "| --- | --- | --- | --- | --- |"
    if probes:
        header += " linear probe before fine-tuning |"
        rule += " --- |"
    if transfer:
        header += f" its fine-tunes against {reference} (mean paired difference) |"
        rule += " --- |"
    lines = [header, rule]
    for arm, seed in pretrainings(protocol):
        folder = protocol.pretrain_folder(arm, seed)
        metrics = read_json(folder / METRICS_FILE)
        link = folder.relative_to(protocol.out).as_posix()
        line = (
            f"| [{arm.title}]({link}/report.md) | {seed} | {metrics.get('steps')} | "
            f"{number(metrics.get('final_loss'))} | {metrics.get('summary', '')} |"
        )
        if probes:
            line += f" {number(probes.get((arm.name, seed)))} |"
        if transfer:
            line += f" {_transfer_of(protocol, rows, arm.name, seed, reference)} |"
        lines.append(line)
    if probes:
        fraction, seed = protocol.fractions[0], protocol.seeds[0]
        lines += ["", (
            "Linear probe: balanced accuracy of a linear probe of the features the new head "
            f"reads, on the split of seed {seed} at fraction {fraction}, scored on its "
            "validation images, before any fine-tuning (`ctxrestore probe`; OUT/probe/). Read "
            "it within one initialisation: pretrainings of one recipe differ by up to the whole "
            "gain, and a draw the probe reads clearly worse transferred worse in "
            "docs/experiments.md 48-49; between pretexts it does not predict transfer."
        )]  # fmt: skip
    return lines


def _pretraining_caveat(protocol: Protocol) -> str:
    seeds, count = len(protocol.seeds), protocol.pretrain_seeds
    if count == 1:
        return ("each pretrained initialisation was pretrained once (seed 0), so the intervals "
                "cover the variation of fine-tuning (split, head, data order), not that of "
                "pretraining")  # fmt: skip
    if count == seeds:
        return (f"each pretrained initialisation was pretrained {count} times, one pretraining "
                "per fine-tuning seed, so the intervals cover the variation of pretraining as "
                "well as that of fine-tuning")  # fmt: skip
    return (f"each pretrained initialisation was pretrained {count} times and fine-tuning seed "
            f"s started from pretraining s mod {count}; the {seeds} pairs share pretrainings, so "
            f"the paired intervals are over the {count} pretrainings (each one's mean "
            f"difference, {count - 1} degrees of freedom) and cover the variation of "
            "pretraining as well as that of fine-tuning")  # fmt: skip


def _two_stage_caveat(protocol: Protocol) -> str:
    """A two-stage arm pretrained for its first stage's budget and then its own again."""
    staged = protocol.two_stage_arms
    if not staged:
        return ""
    steps = protocol.pretrain_options.get("max_steps")
    listed = "; ".join(
        f"{arm.title} started from {protocol.arm(arm.first_stage).title}'s pretraining"
        for arm in staged
    )
    return (f" Two-stage initialisations had twice the pretraining budget ({steps} steps, then "
            f"{steps} more with the encoder fixed): {listed}. Read them against their first "
            "stage: what the second stage adds is the difference.")  # fmt: skip


def environment_caveat(rows: Sequence[dict]) -> str:
    """A grid resumed on another machine mixes kernels: its pairs no longer share their noise."""
    counts = Counter(row.get("environment") or "not recorded" for row in rows)
    if len(counts) < 2:
        return ""
    listed = "; ".join(
        f"{name}: {count} run{'s' * (count != 1)}" for name, count in sorted(counts.items())
    )
    return (f" The runs ran in {len(counts)} environments ({listed}): the same seed gives other "
            "numbers on other kernels, so pairs across them differ by more than the "
            "initialisation (README, Reproducibility); rerun them on one machine to pair "
            "them.")  # fmt: skip


def per_class_lines(
    protocol: Protocol, rows: Sequence[dict], focus: str, reference: str
) -> list[str]:
    """Where `focus`'s difference from `reference` comes from: the paired difference of each
    class's member of the metric's family at each fraction, a table and the classes whose
    interval excludes zero. [] when the metric averages no classes."""
    classes = class_metrics(protocol.metric, {key for row in rows for key in row})
    if not classes:
        return []
    family = classes[0].split("/", 1)[0]
    direction = "higher" if higher_is_better(classes[0]) else "lower"
    lines = [
        f"{protocol.arm(focus).title} minus {protocol.arm(reference).title}, paired by seed, "
        f"per class (`{family}/<class>`, {direction} is better); **bold**: the 95% interval "
        "excludes zero.",
        "",
        "| class | " + " | ".join(protocol.fractions) + " |",
        "|" + " --- |" * (len(protocol.fractions) + 1),
    ]
    clear = {"better": [], "worse": []}
    for key in classes:
        cells = []
        for fraction in protocol.fractions:
            difference = compare(rows, key, focus, reference, fraction)
            state = verdict(difference, key)
            text = (
                interval(difference.mean, difference.low, difference.high, signed=True)
                + f", {difference.wins}/{difference.n}"
            )
            if state in clear:
                clear[state].append(f"{key.split('/', 1)[1]} at {fraction}")
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {key.split('/', 1)[1]} | " + " | ".join(cells) + " |")
    lines.append("")
    if clear["better"] or clear["worse"]:
        for state, found in clear.items():
            if found:
                lines.append(f"- Clearly {state}: {', '.join(found)}.")
    else:
        lines.append("- No class differs clearly at any fraction.")
    return lines


def lost_class_lines(protocol: Protocol, rows: Sequence[dict]) -> list[str]:
    """Per initialisation x fraction, the runs in which some class scored 0 in its
    LOST_CLASS_FAMILIES metric, with their seeds and classes. [] when the rows have no such
    per-class metric."""
    family = LOST_CLASS_FAMILIES.get(protocol.task)
    if family is None:
        return []
    classes = class_metrics(f"{family}/mean", {key for row in rows for key in row})
    if not classes:
        return []
    lines = [
        f"Runs in which a class scored 0 (`{family}/<class>`): the class was never got right, "
        "a failure that a mean over seeds hides.",
        "",
        "| initialisation | " + " | ".join(protocol.fractions) + " |",
        "|" + " --- |" * (len(protocol.fractions) + 1),
    ]
    lost_runs = 0
    for arm in protocol.arms:
        cells = []
        for fraction in protocol.fractions:
            runs = [row for row in rows
                    if row["method"] == arm.name and row["fraction"] == fraction]  # fmt: skip
            failures = []
            for row in sorted(runs, key=lambda row: int(row["seed"])):
                lost = [key.split("/", 1)[1] for key in classes if _is_zero(row.get(key))]
                if lost:
                    failures.append(f"seed {row['seed']}: {', '.join(lost)}")
            lost_runs += len(failures)
            cells.append(f"{len(failures)}/{len(runs)}" + (f" ({'; '.join(failures)})"
                                                           if failures else ""))  # fmt: skip
        lines.append(f"| {arm.title} | " + " | ".join(cells) + " |")
    lines += ["", f"- {lost_runs} of {len(rows)} runs lost a class." if lost_runs
              else "- No run lost a class."]  # fmt: skip
    return lines


def _is_zero(value) -> bool:
    try:
        return float(value) == 0.0
    except (TypeError, ValueError):
        return False


def _settings_lines(settings: dict) -> list[str]:
    lines = ["| setting | value |", "| --- | --- |"]
    return lines + [f"| {key} | {value} |" for key, value in sorted(settings.items())]


def summary_section(
    summary: Sequence[dict], metric: str, reference: str | None, labels: dict, plot: Path
) -> list[str]:
    """The report's table of means and paired differences, and the plot."""
    return [
        "## Summary",
        "",
        *markdown_table(summary, metric=metric, reference=reference, labels=labels),
        "",
        "The same in summary.csv; every run's test metrics in results.csv.",
        "",
        f"![{metric} against label fraction]({plot.name})",
        "",
    ]


def write_report(
    path: Path,
    protocol: Protocol,
    rows: Sequence[dict],
    summary: Sequence[dict],
    plot: Path,
    probes: dict[tuple[str, int], float] | None = None,
) -> Path:
    metric = protocol.metric
    direction = "higher" if higher_is_better(metric) else "lower"
    arms = [arm.name for arm in protocol.arms]
    reference = protocol.reference if protocol.reference in arms else None
    labels = {arm.name: arm.title for arm in protocol.arms}
    heading = ("Label-efficiency benchmark" if protocol.kind == "benchmark"
               else "Ablation of context restoration")  # fmt: skip
    data = protocol.settings.get("data") or f"the built-in {protocol.settings['phantom']} phantom"
    lines = [
        f"# {heading}: {protocol.task}",
        "",
        f"{len(arms)} initialisations x {len(protocol.fractions)} label fractions x "
        f"{len(protocol.seeds)} seeds = {len(rows)} fine-tuning runs on {data}. Test metric: "
        f"`{metric}` ({direction} is better); intervals are 95% Student-t intervals over seeds, "
        "differences are paired by seed (same split, same head weights, same data order)."
        + (
            " Frozen-feature evaluation: every encoder stayed fixed and only the decoder / head "
            "trained, so random weights (normalisation statistics estimated from the training "
            "images) are the random-features control."
            if protocol.settings.get("freeze_encoder")
            else ""
        ),
        "",
        *best_section(protocol, rows, summary),
    ]
    if reference is not None:
        others = [name for name in arms if name != reference]
        lines += [f"Each initialisation against {reference} weights:", "",
                  *comparison_lines(protocol, rows, reference, others), ""]  # fmt: skip
    focus = CONTEXT_RESTORATION if protocol.kind == "benchmark" else DEFAULT_SETTING
    if focus in arms:
        lines += [f"{FOCUS_TITLES[protocol.kind]} ({protocol.arm(focus).title}):", "",
                  *focus_lines(protocol, rows, summary, focus), ""]  # fmt: skip
    staged = protocol.two_stage_arms
    if staged:
        lines += ["Each two-stage initialisation against its first stage alone (what the "
                  "second stage adds):", "",
                  *(line for arm in staged for line in comparison_lines(
                      protocol, rows, arm.first_stage, [arm.name])), ""]  # fmt: skip
    if protocol.kind == "ablation" and DEFAULT_SETTING in arms:
        variants = [arm.name for arm in protocol.arms  # the settings, not the controls
                    if arm.pretrain is not None and arm.name != DEFAULT_SETTING]  # fmt: skip
        lines += ["Each setting against the default:", "",
                  *comparison_lines(protocol, rows, DEFAULT_SETTING, variants), ""]  # fmt: skip
    lines += [
        f"Caveats: {_pretraining_caveat(protocol)}; with {len(protocol.seeds)} seeds an "
        "interval is wide, and 'no clear difference' is not evidence of no difference."
        + _two_stage_caveat(protocol)
        + environment_caveat(rows)
        + (
            " The data is a procedural phantom: the numbers describe the method on it, not on "
            "real scans."
            if protocol.settings.get("data") is None
            else ""
        ),
        "",
        *summary_section(summary, metric, reference, labels, plot),
    ]
    classes = (
        per_class_lines(protocol, rows, focus, reference) if focus in arms and reference else []
    )
    if classes:
        lines += ["## Per class", "", *classes, ""]
    lost = lost_class_lines(protocol, rows)
    if lost:
        lines += ["## Lost classes", "", *lost, ""]
    lines += [
        "## Pretraining",
        "",
        *pretraining_lines(protocol, rows, reference, probes),
        "",
        "## Settings",
        "",
        *_settings_lines(protocol.settings),
        "",
    ]
    text = "\n".join(lines)
    return atomic_write(path, lambda temporary: temporary.write_text(text))

"""A fine-tuning run's report: data, split, what was transferred, curves, test metrics, and
pictures of test predictions (and the confusion matrix for classification)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ctxrestore.engine.environment import environment_summary
from ctxrestore.engine.loop import VALIDATION_FILE, read_log
from ctxrestore.engine.run_folder import METRICS_FILE
from ctxrestore.figures import save_confusion_matrix, save_loss_curve
from ctxrestore.files import atomic_write, read_json

SETTINGS = (
    "task", "init", "fraction", "image_size", "spatial_dims", "batch_size", "learning_rate",
    "pretrained_lr_scale", "freeze_encoder", "transfer_stages", "fresh_decoder_levels",
    "head_only_steps", "box_head",
    "warmup_steps", "epochs",
    "max_steps", "patience", "augment", "balance", "adapt_channels", "seed",
)  # fmt: skip
PREVIEW_IMAGES = 8


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metric_tables(metrics: dict[str, float], headline: str) -> list[str]:
    """Overall metrics (the headline first), then one row per class / organ / region with a
    column per metric ("metric/name" keys)."""
    overall = {k: v for k, v in metrics.items() if "/" not in k or k.endswith("/mean")}
    per_name: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key not in overall:
            metric, name = key.split("/", 1)
            per_name.setdefault(name, {})[metric] = value
    lines = ["| metric | value |", "| --- | --- |"]
    lines.append(f"| **{headline}** | **{_number(metrics.get(headline))}** |")
    lines += [f"| {k} | {_number(v)} |" for k, v in sorted(overall.items()) if k != headline]
    lines.append("")
    if per_name:
        columns = list(dict.fromkeys(m for row in per_name.values() for m in row))
        lines += [
            "| | " + " | ".join(columns) + " |",
            "| --- |" + " --- |" * len(columns),
            *(
                f"| {name} | " + " | ".join(_number(row.get(c)) for c in columns) + " |"
                for name, row in per_name.items()
            ),
            "",
        ]
    return lines


def _validation_curve(run_dir: Path, metric: str) -> list[str]:
    path = run_dir / VALIDATION_FILE
    if not path.is_file():
        return []
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return []
    save_loss_curve(
        run_dir / "validation.png",
        [int(row["step"]) for row in rows],
        [float(row[metric]) if row[metric] else math.nan for row in rows],
        title=f"validation {metric}",
        ylabel=metric,
        log_scale=False,
    )
    return ["![validation](validation.png)", ""]


@torch.no_grad()
def _pictures(run_dir: Path, task, model: nn.Module, data, split, device) -> list[str]:
    loader = DataLoader([data.items[i] for i in split.test], batch_size=64)
    first = next(iter(loader))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in first.items()}
    batch = {k: v[:PREVIEW_IMAGES] for k, v in batch.items()}
    generator = torch.Generator(device=device).manual_seed(0)
    task.save_preview(run_dir / "test_predictions.png", model, batch, generator)
    lines = ["## Test predictions", "", "![test predictions](test_predictions.png)", ""]
    if task.name == "classify":
        from ctxrestore.tasks.classify import confusion_matrix

        truth, predicted = [], []
        for batch in loader:
            output = task.predict(model, batch["image"].to(device))
            truth += batch["label"].tolist()
            predicted += output["label"].cpu().tolist()
        matrix = confusion_matrix(np.array(truth), np.array(predicted), task.num_classes)
        save_confusion_matrix(
            run_dir / "confusion.png", matrix, task.class_names, title="test confusion matrix"
        )
        lines += ["## Confusion matrix (test)", "", "![confusion matrix](confusion.png)", ""]
    return lines


def write_finetuning_report(
    run_dir: Path, task, model: nn.Module, data, split, device, figures: bool = True
) -> Path:
    """Write report.md into `run_dir`, and with `figures` loss.png, validation.png and the
    test pictures (a benchmark's hundreds of runs skip them: they cost more than a tiny run)."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json")
    summary = read_json(run_dir / METRICS_FILE)
    rows = read_log(run_dir)
    if rows and figures:
        save_loss_curve(
            run_dir / "loss.png",
            [int(row["step"]) for row in rows],
            [row["loss"] for row in rows],
            title=f"{task.name}: training loss",
        )
    test = summary["test"]
    transfer = summary["transfer"]
    parts = sorted(set(transfer["transferred"]) | set(transfer["random"]))
    counts = summary["split"]
    # The pretrained weights' fingerprint names the pretraining even after its folder moves.
    weights = f" (weights {summary['init_weights']})" if summary.get("init_weights") else ""
    lines = [
        f"# Fine-tuning: {task.name}",
        "",
        f"Data: {data.source}. Initialisation: `{config['init']}`{weights}. "
        f"Labelled training fraction: {config['fraction']} ({counts['train']['cases']} cases). "
        f"Steps: {summary['steps']}"
        f"{' (stopped early)' if summary['stopped_early'] else ''}; best validation "
        f"{task.metric} {_number(summary['best_validation'][task.metric])} at step "
        f"{summary['best_step']}, whose weights are in `best/` and were tested.",
        "",
        *([f"Preprocessing: `{data.preprocessing}`.", ""] if data.preprocessing else []),
        *([f"Bad files: {data.skipped}.", ""] if data.skipped else []),
        *([environment, ""] if (environment := environment_summary(run_dir)) else []),
        f"## Test metrics ({counts['test']['cases']} cases, {counts['test']['items']} images)",
        "",
        *(_metric_tables(test, task.metric) if test else ["No test cases: too few cases.", ""]),
        "## What was transferred",
        "",
        "| part | tensors | initialisation |",
        "| --- | --- | --- |",
        *(
            f"| {part} | {transfer['transferred'].get(part, transfer['random'].get(part))} | "
            + (
                "pretrained" if part in transfer["transferred"]
                else f"random ({transfer['reasons'].get(part, '')})"
            )
            + " |"
            for part in parts
        ),
        "",
        *(f"First layer adapted: `{name}` ({how})." for name, how in transfer["adapted"].items()),
        "",
        "## Split",
        "",
        "| split | cases | images |",
        "| --- | --- | --- |",
        *(f"| {name} | {counts[name]['cases']} | {counts[name]['items']} |"
          for name in ("train", "val", "test")),
        "",
        "The test and validation cases depend on the seed only, not on the fraction; "
        "`split.json` lists them.",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(f"| {key} | {config[key]} |" for key in SETTINGS),
        "",
        "## Curves",
        "",
        *(["![training loss](loss.png)", ""] if rows and figures else []),
        *(_validation_curve(run_dir, task.metric) if figures else []),
        *(_pictures(run_dir, task, model, data, split, device) if figures and split.test else []),
    ]  # fmt: skip
    text = "\n".join(lines)
    return atomic_write(run_dir / "report.md", lambda temporary: temporary.write_text(text))

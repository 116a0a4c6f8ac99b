"""A pretraining run's report: what was run, how the loss fell, what restoration looks like."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ctxrestore.engine.checkpoint import SPEC_FILE
from ctxrestore.engine.environment import environment_summary
from ctxrestore.engine.loop import read_log
from ctxrestore.engine.run_folder import METRICS_FILE
from ctxrestore.figures import save_loss_curve
from ctxrestore.files import atomic_write, read_json

# The run's own settings; the pretext's (swaps, patch size, temperature...) come from the
# checkpoint's spec, so the table lists only what the chosen pretext used.
SETTINGS = (
    "method", "network", "width", "spatial_dims", "image_size", "batch_size", "learning_rate",
    "seed",
)  # fmt: skip


def write_pretraining_report(
    run_dir: Path,
    report_path: Path | None = None,
    extra_lines: Sequence[str] = (),
) -> Path:
    """Write loss.png into `run_dir` and a Markdown report (default run_dir/report.md).

    `extra_lines` (Markdown) are appended, e.g. the demo's phantom galleries.

    Image links are relative to the report, so the report can live above the run folder.
    """
    run_dir = Path(run_dir)
    report_path = Path(report_path or run_dir / "report.md")
    config = read_json(run_dir / "config.json")
    metrics = read_json(run_dir / METRICS_FILE)
    rows = read_log(run_dir)
    save_loss_curve(
        run_dir / "loss.png",
        [int(row["step"]) for row in rows],
        [row["loss"] for row in rows],
        title=f"{config.get('method', 'context_restoration')}: training loss",
    )
    link = Path(os.path.relpath(run_dir, report_path.parent))
    source = config["data"] or f"built-in phantom '{config['phantom']}'"
    lines = [
        f"# Pretraining: {config.get('method', 'context_restoration')}",
        "",
        f"Data: {source}. Steps: {metrics['steps']}. Checkpoint: `{run_dir}` "
        "(`ctxrestore.load_pretrained` rebuilds it).",
        "",
        *([f"{started}.", ""] if (started := _started_from(run_dir)) else []),
        *([environment, ""] if (environment := environment_summary(run_dir)) else []),
        "| setting | value |",
        "| --- | --- |",
        *(f"| {key} | {config[key]} |" for key in SETTINGS),
        *(f"| {key} | {value} |" for key, value in _pretext_settings(run_dir)),
        "",
        "## Held-out metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(
            f"| {key} | {value:.5g} |"
            for key, value in metrics.items()
            if key not in ("steps", "summary", "skipped_files")
        ),
        "",
        metrics.get("summary", ""),
        "",
        *([f"Bad files: {metrics['skipped_files']}.", ""] if "skipped_files" in metrics else []),
        "## Loss",
        "",
        f"![training loss]({link / 'loss.png'})",
        "",
        "## Preview (held-out images)",
        "",
        f"![preview]({link / 'preview.png'})",
        "",
        *extra_lines,
    ]
    text = "\n".join(lines)
    return atomic_write(report_path, lambda temporary: temporary.write_text(text))


def describe_start(init: dict) -> str:
    """What --init gave the network: spec["init"] (the folder and its transfer report)."""
    moved = ", ".join(f"{part} ({count} tensors)" for part, count in init["transferred"].items())
    fresh = ", ".join(f"{part} ({init['reasons'].get(part, '')})" for part in init["random"])
    fresh = fresh or "nothing"
    frozen = f"; kept fixed: {', '.join(init['frozen'])}" if init.get("frozen") else ""
    return f"Started from `{init['folder']}`: {moved} from its weights; random: {fresh}{frozen}"


def _started_from(run_dir: Path) -> str:
    spec_path = run_dir / SPEC_FILE
    init = read_json(spec_path).get("init") if spec_path.is_file() else None
    return describe_start(init) if init else ""


def _pretext_settings(run_dir: Path) -> list[tuple[str, object]]:
    """The pretext's parameters as the checkpoint records them, nested ones dotted
    ("views.scale"); none when the run wrote no checkpoint yet."""
    spec_path = run_dir / SPEC_FILE
    if not spec_path.is_file():
        return []

    def flat(params: dict, prefix: str = "") -> list[tuple[str, object]]:
        rows = []
        for key, value in params.items():
            if isinstance(value, dict):
                rows += flat(value, f"{prefix}{key}.")
            else:
                rows.append((f"{prefix}{key}", value))
        return rows

    return flat(read_json(spec_path)["pretext"]["params"])

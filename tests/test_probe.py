"""`ctxrestore probe`: linear probes of untrained networks, to rank initialisations."""

import csv
import json

import pytest
import torch
from conftest import TINY_PRETRAIN
from typer.testing import CliRunner

import ctxrestore
from ctxrestore.cli import app
from ctxrestore.engine.checkpoint import load_checkpoint, save_checkpoint
from ctxrestore.errors import CtxRestoreError
from ctxrestore.models import build_model
from ctxrestore.models.spec import unet_spec
from ctxrestore.tasks.localize import LocalizationTask
from ctxrestore.tasks.probe import (
    IGNORED,
    ProbeConfig,
    _batches,
    balanced_accuracy,
    box_labels,
    class_recalls,
    collect,
    estimate_statistics,
    fit_linear_probe,
    keep_rates,
    predict_linear_probe,
    probe_targets,
)
from ctxrestore.tasks.segment import SegmentationTask

runner = CliRunner()
TINY = dict(num_images=40, image_size=32, width=4, device="cpu")


def _cli_options(options: dict) -> list[str]:
    return [part for key, value in options.items()
            for part in (f"--{key.replace('_', '-')}", str(value))]  # fmt: skip


# ----------------------------------------------------------------------------- the probe itself
def test_probe_reads_features_that_hold_the_class_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=generator)
    noise = torch.randn(600, 5, generator=generator)
    informative = noise * 0.1 + torch.nn.functional.one_hot(labels, 5).float() * 3
    train, test = slice(0, 400), slice(400, 600)
    for features, low, high in ((informative, 0.99, 1.0), (noise, 0.0, 0.5)):
        probe = fit_linear_probe(features[train], labels[train], 3)
        recalls = class_recalls(predict_linear_probe(probe, features[test]), labels[test], 3)
        assert low <= balanced_accuracy(recalls) <= high


def test_probe_weighs_a_rare_class_as_much_as_a_common_one():
    # 95% class 0: an unweighted probe could score 95% accuracy by ignoring class 1, whose
    # feature overlaps class 0's; the balanced probe must find class 1 most of the time.
    generator = torch.Generator().manual_seed(1)
    labels = (torch.rand(2000, generator=generator) < 0.05).long()
    features = labels[:, None].float() * 1.5 + torch.randn(2000, 1, generator=generator)
    probe = fit_linear_probe(features[:1500], labels[:1500], 2)
    recalls = class_recalls(predict_linear_probe(probe, features[1500:]), labels[1500:], 2)
    assert recalls[1] > 0.6


def test_balanced_accuracy_is_the_mean_recall_over_the_classes_present():
    predicted = torch.tensor([0, 0, 1, 1, 1, 0])
    truth = torch.tensor([0, 0, 0, 1, 1, 1])
    recalls = class_recalls(predicted, truth, 3)
    assert recalls == [2 / 3, 2 / 3, None]  # class 2 never occurs: no recall, not 0
    assert balanced_accuracy(recalls) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- targets, samples
def test_box_labels_name_one_organ_and_ignore_overlaps():
    # Organ 0 covers columns 1-3, organ 1 columns 3-5 of one row; organ 2 is absent.
    boxes = torch.tensor([[[[0, 1], [1, 4]], [[0, 3], [1, 6]], [[0, 0], [1, 8]]]]).float()
    present = torch.tensor([[1.0, 1.0, 0.0]])
    labels = box_labels(boxes, present, (2, 8))
    assert labels[0, 0].tolist() == [0, 1, 1, IGNORED, 2, 2, 0, 0]
    assert (labels[0, 1] == 0).all()


def test_localize_targets_use_label_maps_where_the_data_has_them():
    task = LocalizationTask(organ_names=("liver", "spleen"), organ_values=(3, 5))
    mask = torch.tensor([[[0, 3, 5, 7]]])
    batch = {"image": torch.zeros(1, 1, 1, 4), "mask": mask,
             "boxes": torch.zeros(1, 2, 2, 2), "present": torch.zeros(1, 2)}  # fmt: skip
    assert probe_targets(task, batch).tolist() == [[[0, 1, 2, 0]]]  # other label values: 0
    boxes_only = LocalizationTask(organ_names=("liver", "spleen"))
    assert (probe_targets(boxes_only, batch) == 0).all()  # no box present: all background


def test_each_class_keeps_at_most_the_cap_and_a_rare_class_keeps_all():
    task = SegmentationTask(label_values=(0, 1), label_names=("background", "lesion"))
    items = []
    for index in range(6):
        mask = torch.zeros(16, 16, dtype=torch.long)
        mask[index : index + 2, 4:6] = 1  # 4 lesion pixels per image, 24 in all
        items.append({"image": torch.randn(1, 16, 16), "mask": mask})
    rates = keep_rates(task, items, 2, cap=300)
    assert rates[1] == 1.0 and rates[0] == pytest.approx(300 / (6 * 256 - 24))
    encoder = {"stage_channels": [4, 8], "convs_per_stage": [1, 1], "norm": "batch"}
    model = build_model(unet_spec(2, 1, 2, encoder))
    features, targets = collect(
        model, task, items, rates, torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    assert features.shape[1] == 4  # the decoder's output channels: the head input
    assert int((targets == 1).sum()) == 24
    assert 240 < int((targets == 0).sum()) < 360


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def blind_pretraining(tmp_path_factory):
    """A U-Net pretraining whose decoder's last normalisation is zeroed: its head input is 0
    everywhere, so no probe can tell any class from it (a known answer: chance)."""
    out = tmp_path_factory.mktemp("blind")
    ctxrestore.pretrain(out=out, network="unet", phantom="brain", **TINY_PRETRAIN)
    state, spec = load_checkpoint(out)
    norms = [name for name in state if name.startswith("decoder.") and name.endswith("norm.weight")]
    last_norm = sorted(norms)[-1]
    for name in (last_norm, last_norm.replace(".weight", ".bias")):
        state[name] = torch.zeros_like(state[name])
    save_checkpoint(out, state, spec)
    return out


def test_probe_reads_the_weights_given_through_the_cli(tmp_path, blind_pretraining):
    out = tmp_path / "probe"
    arguments = ["probe", "segment", "--init", "random", "--init", str(blind_pretraining),
                 "--out", str(out), "--fraction", "0.5"]  # fmt: skip
    result = runner.invoke(app, [*arguments, *_cli_options(TINY)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "probe.csv").open()))
    assert [row["init"] for row in rows] == ["random", str(blind_pretraining)]
    random_score, blind_score = (float(row["balanced_accuracy"]) for row in rows)
    classes = [key for key in rows[1] if key.startswith("recall/") and rows[1][key] != ""]
    assert len(classes) == 4  # background and three tumour classes, all in the val split
    assert blind_score == pytest.approx(1 / len(classes))  # one class predicted everywhere
    assert random_score > blind_score + 0.1  # random features do tell some classes apart
    assert rows[0]["init_weights"] == "" and len(rows[1]["init_weights"]) == 16
    assert rows[1]["transferred"] == "encoder, decoder"
    assert {row["features"] for row in rows} == {"decoder"}
    assert {row["scored_on"] for row in rows} == {"val"}
    report = (out / "report.md").read_text()
    ranking = [line for line in report.splitlines() if line.startswith("| 1 |")]
    assert ranking and "`random`" in ranking[0]
    for part in ("balanced accuracy", "necrotic_core", "Between different pretexts"):
        assert part in report
    saved = json.loads((out / "probe.json").read_text())
    assert saved["config"]["init"] == ["random", str(blind_pretraining)]
    assert saved["config"]["image_size"] == 32


def test_the_probe_uses_finetune_s_split_and_weights(tmp_path):
    """The same seed gives the same random weights and split as finetune: the same score; the
    probed split is the one asked for."""
    first = ctxrestore.probe(task="segment", init=["random"], out=tmp_path / "a", seed=3, **TINY)
    again = ctxrestore.probe(task="segment", init=["random"], out=tmp_path / "b", seed=3, **TINY)
    other = ctxrestore.probe(task="segment", init=["random"], out=tmp_path / "c", seed=4, **TINY)
    on_test = ctxrestore.probe(
        task="segment", init=["random"], out=tmp_path / "d", seed=3, score_on="test", **TINY
    )
    assert first.rows[0]["balanced_accuracy"] == again.rows[0]["balanced_accuracy"]
    assert first.rows[0]["balanced_accuracy"] != other.rows[0]["balanced_accuracy"]
    assert on_test.rows[0]["scored_samples"] != first.rows[0]["scored_samples"]  # 8 vs 4 cases


@pytest.mark.parametrize(
    ("task", "options", "features", "classes"),
    [
        ("classify", {}, "pooled", None),
        ("localize", {"box_head": "regression"}, "encoder", "background"),
        ("localize", {"box_head": "mask"}, "decoder", "background"),
    ],
)
def test_every_task_network_is_probed(tmp_path, tiny_pretrain, task, options, features, classes):
    size = {}
    pretrained = tmp_path / "pre"
    network = "sononet_unet" if options.get("box_head") == "mask" else "sononet"
    phantom = "ultrasound" if task == "classify" else "abdomen"
    ctxrestore.pretrain(out=pretrained, network=network, phantom=phantom,
                        **{**tiny_pretrain, **size})  # fmt: skip
    result = ctxrestore.probe(task=task, init=["random", str(pretrained)], out=tmp_path / "p",
                              fraction="0.5", **{**TINY, **size, **options})  # fmt: skip
    assert [row["features"] for row in result.rows] == [features, features]
    for row in result.rows:
        assert 0.0 <= row["balanced_accuracy"] <= 1.0 and row["train_samples"] > 0
    assert result.rows[1]["transferred"] != "nothing"
    if classes:
        assert f"recall/{classes}" in result.rows[0]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"init": ["random", "random"]}, "--init random is given twice"),
        ({"init": []}, "at least one --init"),
        ({"init": ["no_such_folder"]}, "--init no_such_folder: no such folder"),
        ({"init": ["random"], "score_on": "train"}, "score_on must be one of"),
        ({"init": ["random"], "max_samples_per_class": 2}, "max_samples_per_class must be >= 10"),
        ({"init": ["random"], "transfer_stages": 2}, "give a pretraining folder"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, options, message):
    with pytest.raises(CtxRestoreError, match=message):
        ProbeConfig(task="segment", out=tmp_path, **options)


def test_bad_options_are_one_line_on_the_command_line(tmp_path):
    result = runner.invoke(
        app, ["probe", "classify", "--init", "random", "--fresh-decoder-levels", "1",
              "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "fresh_decoder_levels" in result.output and "Traceback" not in result.output


def test_pretrainings_on_differently_scaled_files_are_refused(tmp_path, blind_pretraining):
    """Probed on folder data, each pretraining's recorded preprocessing would scale the images
    differently for each initialisation; without --modality that is refused by name."""
    data = ctxrestore.api.phantoms("brain", out=tmp_path / "data", count=12, image_size=32)
    folders = []
    for modality in ("mr", "generic"):
        folder = tmp_path / modality
        state, spec = load_checkpoint(blind_pretraining)
        spec["preprocessing"] = {"modality": modality, "window": None, "target_spacing": None}
        save_checkpoint(folder, state, spec)
        folders.append(str(folder))
    with pytest.raises(CtxRestoreError, match=r"preprocessed differently.*give --modality"):
        ctxrestore.probe(task="segment", data=data, init=folders, out=tmp_path / "p", **TINY)
    result = ctxrestore.probe(task="segment", data=data, init=folders, out=tmp_path / "p",
                              modality="generic", **TINY)  # fmt: skip
    assert len(result.rows) == 2


def test_a_glob_pattern_stands_for_the_pretrainings_it_matches(tmp_path, blind_pretraining):
    state, spec = load_checkpoint(blind_pretraining)
    for draw in (1, 0):
        save_checkpoint(tmp_path / f"pre_s{draw}", state, spec)
    (tmp_path / "pre_s0.log").write_text("the log beside a run is not a pretraining")
    config = ProbeConfig(
        task="segment", out=tmp_path / "p", init=["random", str(tmp_path / "pre_s*")]
    )
    assert config.init == ("random", str(tmp_path / "pre_s0"), str(tmp_path / "pre_s1"))
    with pytest.raises(CtxRestoreError, match="no folder matches"):
        ProbeConfig(task="segment", out=tmp_path / "p", init=[str(tmp_path / "other_*")])


def test_volumes_are_probed_per_voxel(tmp_path):
    result = ctxrestore.probe(task="segment", init=["random"], out=tmp_path, spatial_dims=3,
                              **{**TINY, "image_size": 16, "num_images": 12})  # fmt: skip
    row = result.rows[0]
    assert row["features"] == "decoder" and row["channels"] == TINY["width"]
    # every voxel of the one validation volume up to the cap: 16**3 = 4,096
    assert row["scored_samples"] == 16**3
    assert 0.0 <= row["balanced_accuracy"] <= 1.0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_chunks_hold_at_least_two_items_and_every_item_once(spatial_dims):
    shape = (1,) + (4,) * spatial_dims
    for count in range(2, 41):
        items = [{"image": torch.full(shape, float(index))} for index in range(count)]
        chunks = [batch["image"][:, 0].flatten(1)[:, 0].tolist() for batch in _batches(items)]
        assert all(len(chunk) >= 2 for chunk in chunks), (count, chunks)
        assert [index for chunk in chunks for index in chunk] == list(range(count))


def test_one_training_image_is_refused_by_name():
    model = build_model(unet_spec(2, 1, 2, {"stage_channels": [4, 8], "convs_per_stage": [1, 1],
                                           "norm": "batch"}))  # fmt: skip
    with pytest.raises(CtxRestoreError, match="one labelled training image"):
        estimate_statistics(model, [{"image": torch.zeros(1, 16, 16)}], torch.device("cpu"))

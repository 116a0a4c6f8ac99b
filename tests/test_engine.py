"""Engine pieces: atomic files, safe checkpoint loading, the resumable sharded sampler."""

import math

import pytest
import torch

from ctxrestore.engine.checkpoint import (
    atomic_write,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
    weights_fingerprint,
)
from ctxrestore.engine.loop import LoopConfig
from ctxrestore.engine.sampler import EpochSampler
from ctxrestore.errors import CtxRestoreError


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")

    def crash(temporary):
        temporary.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]  # no temporary left behind


def test_checkpoint_round_trip(tmp_path):
    state = {"encoder.weight": torch.randn(3, 2), "head.bias": torch.zeros(3)}
    save_checkpoint(tmp_path, state, {"format": 1, "name": "x"})
    loaded, spec = load_checkpoint(tmp_path)
    assert spec == {"format": 1, "name": "x"}
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert weights_fingerprint(loaded) == weights_fingerprint(state)


def test_the_weights_fingerprint_changes_with_any_value_name_dtype_or_shape():
    state = {"encoder.weight": torch.randn(3, 2), "steps": torch.tensor(7)}
    fingerprint = weights_fingerprint(state)
    assert len(fingerprint) == 16
    assert fingerprint == weights_fingerprint(dict(reversed(state.items())))  # order-free
    nudged = state["encoder.weight"].clone()
    nudged[2, 1] = torch.nextafter(nudged[2, 1], torch.tensor(math.inf))  # one ulp
    others = [
        {**state, "encoder.weight": nudged},
        {**state, "steps": torch.tensor(8)},
        {"decoder.weight": state["encoder.weight"], "steps": state["steps"]},
        {**state, "encoder.weight": state["encoder.weight"].double()},
        {**state, "encoder.weight": state["encoder.weight"].reshape(2, 3)},
    ]
    assert len({fingerprint, *(weights_fingerprint(other) for other in others)}) == 1 + len(others)
    # The values count, not their memory layout.
    transposed = state["encoder.weight"].t()
    assert weights_fingerprint({"w": transposed}) == weights_fingerprint(
        {"w": transposed.contiguous()})  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_folder", "does not exist"),
        ("no_weights", "model.safetensors is missing"),
        ("bad_weights", "cannot be read as safetensors"),
        ("bad_spec", "not valid JSON"),
    ],
)
def test_bad_checkpoints_name_the_file(tmp_path, damage, message):
    folder = tmp_path / "run"
    save_checkpoint(folder, {"w": torch.ones(2)}, {"format": 1})
    if damage == "no_folder":
        folder = tmp_path / "missing"
    elif damage == "no_weights":
        (folder / "model.safetensors").unlink()
    elif damage == "bad_weights":
        (folder / "model.safetensors").write_bytes(b"\x00garbage")
    else:
        (folder / "spec.json").write_text("{not json")
    with pytest.raises(CtxRestoreError, match=message):
        load_checkpoint(folder)


def test_training_state_refuses_pickled_objects(tmp_path):
    save_training_state(tmp_path, {"step": 3, "tensor": torch.ones(1)})
    assert load_training_state(tmp_path)["step"] == 3
    torch.save({"step": 3, "evil": object()}, tmp_path / "training_state.pt")
    with pytest.raises(CtxRestoreError, match="cannot be read"):
        load_training_state(tmp_path)
    assert load_training_state(tmp_path / "nothing") is None


def test_sampler_shards_are_disjoint_and_cover_each_step():
    shards = []
    for rank in range(2):
        sampler = EpochSampler(20, batch_size=8, seed=1, rank=rank, world_size=2)
        sampler.set_position(epoch=3)
        shards.append(list(sampler))
    assert len(shards[0]) == len(shards[1]) == 8  # 2 steps of 4 per rank; 4 items dropped
    assert not set(shards[0]) & set(shards[1])


def test_sampler_resumes_mid_epoch_and_reshuffles_per_epoch():
    sampler = EpochSampler(40, batch_size=4, seed=0)
    sampler.set_position(epoch=2)
    whole = list(sampler)
    sampler.set_position(epoch=2, start_batch=3)
    assert list(sampler) == whole[12:]
    sampler.set_position(epoch=3)
    assert list(sampler) != whole


def test_sampler_and_loop_reject_bad_sizes():
    with pytest.raises(CtxRestoreError, match="fewer than batch_size"):
        EpochSampler(5, batch_size=8, seed=0)
    with pytest.raises(CtxRestoreError, match="divisible by the number of processes"):
        EpochSampler(50, batch_size=9, seed=0, world_size=2)
    with pytest.raises(CtxRestoreError, match="precision"):
        LoopConfig(max_steps=1, batch_size=1, precision="fp8")
    with pytest.raises(CtxRestoreError, match="max_steps must be >= 1"):
        LoopConfig(max_steps=0, batch_size=1)


class _RegressTask:
    """Fit y = 2x with one linear layer: a loss that falls, so validation improves."""

    def training_loss(self, model, batch, generator):
        return torch.nn.functional.mse_loss(model(batch["image"]), 2 * batch["image"])

    def save_preview(self, path, model, batch, generator):
        pass


class _Points(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        return {"image": torch.tensor([index / 16.0])}


def _fit_with_validation(run_dir, scores, *, max_steps, patience, resume=False):
    """Train with a validation whose scores come from `scores` in order; return the result."""
    from ctxrestore.engine.distributed import DistributedContext
    from ctxrestore.engine.loop import Validation, fit

    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    calls = iter(scores)
    validation = Validation(
        every=2,
        evaluate=lambda m: {"score": next(calls), "other": 1.0},
        metric="score",
        patience=patience,
    )
    config = LoopConfig(max_steps=max_steps, batch_size=4, checkpoint_every=2, log_every=1)
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    result = fit(
        model=model,
        dataset=_Points(),
        task=_RegressTask(),
        config=config,
        context=context,
        run_dir=run_dir,
        spec={"format": 1},
        resume=resume,
        validation=validation,
    )
    return result, model


def test_validation_keeps_the_best_checkpoint_and_stops_early(tmp_path):
    # Scores at steps 2, 4, 6, 8, 10: best at step 4, then three without improvement.
    result, model = _fit_with_validation(
        tmp_path, [0.1, 0.5, 0.4, 0.3, 0.2, 0.9], max_steps=20, patience=3
    )
    assert result.stopped_early and result.steps == 10
    assert (result.best_step, result.best_score) == (4, 0.5)
    rows = (tmp_path / "validation.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["step", "epoch", "best", "score"]
    assert [row.split(",")[2] for row in rows[1:]] == ["1", "1", "0", "0", "0"]
    best, _ = load_checkpoint(tmp_path / "best")
    final, _ = load_checkpoint(tmp_path)
    assert torch.equal(final["weight"], model.weight.detach())
    assert not torch.equal(best["weight"], final["weight"])  # best is the step-4 weights


def test_validation_state_survives_resume(tmp_path):
    # First run: 6 steps (validations at 2, 4, 6; best at 4, one stale).
    _fit_with_validation(tmp_path, [0.1, 0.5, 0.4], max_steps=6, patience=2)
    # Resumed to 20 steps: one more stale validation (step 8) reaches patience 2.
    result, _ = _fit_with_validation(tmp_path, [0.3, 0.9], max_steps=20, patience=2, resume=True)
    assert result.resumed_from == 6 and result.steps == 8 and result.stopped_early
    assert (result.best_step, result.best_score) == (4, 0.5)
    steps = [row.split(",")[0] for row in (tmp_path / "validation.csv").read_text().splitlines()]
    assert steps == ["step", "2", "4", "6", "8"]
    # A finished (early-stopped) run resumes to nothing.
    again, _ = _fit_with_validation(tmp_path, [], max_steps=20, patience=2, resume=True)
    assert again.steps == 8 and again.stopped_early


def test_delayed_layers_hold_their_values_then_warm_up_and_decay(tmp_path):
    """LP-FT: a delayed prefix keeps its exact values for `delay` steps while the rest
    trains, then gets the warm-up and cosine decay fitted into the steps left."""
    from ctxrestore.engine.distributed import DistributedContext
    from ctxrestore.engine.loop import _schedule, fit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
    seen = []  # the weights each step starts from

    class Task(_RegressTask):
        def training_loss(self, wrapped, batch, generator):
            seen.append([layer.weight.detach().clone() for layer in model])
            return super().training_loss(wrapped, batch, generator)

    config = LoopConfig(max_steps=7, batch_size=4, warmup_steps=2, log_every=1)
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    fit(model=model, dataset=_Points(), task=Task(), config=config, context=context,
        run_dir=tmp_path, spec={"format": 1}, delays={"0.": 3})  # fmt: skip
    first = [step[0] for step in seen]
    assert all(torch.equal(first[0], weights) for weights in first[:4])  # steps 0-2 held
    assert not torch.equal(first[3], first[4])  # step 3 trains it
    assert not torch.equal(seen[0][1], seen[1][1])  # the other layer trains from step 0
    held, free = _schedule(config, 3), _schedule(config)
    assert [held(s) for s in range(4)] == [0.0, 0.0, 0.0, 0.5]
    # warm-up over 2 steps from step 3, then a cosine over the 2 steps left (the free
    # layers' cosine spans 5)
    assert held(4) == held(5) == free(1) == free(2) == 1.0
    assert held(6) == pytest.approx(0.5)
    assert free(4) == pytest.approx(0.5 * (1 + math.cos(0.4 * math.pi)))
    assert held(7) == free(7) == pytest.approx(0.0)

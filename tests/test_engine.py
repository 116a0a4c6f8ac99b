"""Engine pieces: atomic files, safe checkpoint loading, the resumable sharded sampler."""

import pytest
import torch

from ctxrestore.engine.checkpoint import (
    atomic_write,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
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

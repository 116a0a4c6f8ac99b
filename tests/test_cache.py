import os
from pathlib import Path

import numpy as np
import pytest

from ctxrestore.data.cache import ArrayCache, default_cache_dir, file_fingerprint
from ctxrestore.data.preprocess import Preprocessing
from ctxrestore.errors import CtxRestoreError


class Creator:
    """A create() callable that counts its calls."""

    def __init__(self, value: float = 1.0):
        self.calls = 0
        self.value = value

    def __call__(self):
        self.calls += 1
        image = np.full((1, 4, 5, 6), self.value, np.float32)
        label = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
        return {"image": image, "label": label}, {"spacing": (1.0, 2.0, 3.0), "case": "a"}


def _key_parts(files, prep=None):
    prep = prep or Preprocessing(modality="ct")
    return {"files": file_fingerprint(files), "preprocessing": prep.to_json(), "what": "image"}


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "case.nii.gz"
    path.write_bytes(b"voxels")
    return path


def test_miss_then_hit_is_memory_mapped(tmp_path, source):
    cache, create = ArrayCache(tmp_path / "cache"), Creator()
    first, first_meta = cache.get(_key_parts([source]), create)
    second, second_meta = cache.get(_key_parts([source]), create)
    assert create.calls == 1 and (cache.misses, cache.hits) == (1, 1)
    for arrays in (first, second):
        assert isinstance(arrays["image"], np.memmap) and not arrays["image"].flags.writeable
        np.testing.assert_array_equal(arrays["image"], create()[0]["image"])
        np.testing.assert_array_equal(arrays["label"], create()[0]["label"])
        assert arrays["label"].dtype == np.uint8
    assert first_meta == second_meta == {"spacing": [1.0, 2.0, 3.0], "case": "a"}
    entries = [path for path in (tmp_path / "cache").rglob("meta.json")]
    assert len(entries) == 1
    assert sorted(p.name for p in entries[0].parent.iterdir()) == [
        "image.npy",
        "label.npy",
        "meta.json",
    ]
    assert not list((tmp_path / "cache").rglob(".*"))  # no temporary folders left


def test_a_changed_file_is_a_miss(tmp_path, source):
    cache, create = ArrayCache(tmp_path / "cache"), Creator()
    cache.get(_key_parts([source]), create)
    status = source.stat()
    os.utime(source, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    cache.get(_key_parts([source]), create)
    source.write_bytes(b"more voxels")
    os.utime(source, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    cache.get(_key_parts([source]), create)
    assert create.calls == 3 and cache.hits == 0


def test_a_different_preprocessing_is_another_entry(tmp_path, source):
    cache = ArrayCache(tmp_path / "cache")
    ct, _ = cache.get(_key_parts([source], Preprocessing(modality="ct")), Creator(1.0))
    lung, _ = cache.get(
        _key_parts([source], Preprocessing(modality="ct", window="lung")), Creator(2.0)
    )
    assert cache.misses == 2
    assert ct["image"].max() == 1.0 and lung["image"].max() == 2.0
    assert len(list((tmp_path / "cache").rglob("meta.json"))) == 2


def test_disabled_cache_calls_create_every_time(source):
    cache, create = ArrayCache(None), Creator()
    for _ in range(3):
        arrays, _ = cache.get(_key_parts([source]), create)
        assert not isinstance(arrays["image"], np.memmap)
    assert create.calls == 3 and cache.misses == 3 and cache.hits == 0


@pytest.mark.parametrize("damage", ["delete meta.json", "truncate image.npy", "delete label.npy"])
def test_a_partial_entry_is_rebuilt(tmp_path, source, damage):
    cache, create = ArrayCache(tmp_path / "cache"), Creator()
    cache.get(_key_parts([source]), create)
    entry = next((tmp_path / "cache").rglob("meta.json")).parent
    action, name = damage.split()
    if action == "delete":
        (entry / name).unlink()
    else:
        (entry / name).write_bytes((entry / name).read_bytes()[:100])
    arrays, metadata = cache.get(_key_parts([source]), create)
    assert create.calls == 2 and cache.hits == 0
    np.testing.assert_array_equal(arrays["image"], 1.0)
    assert (entry / "meta.json").is_file() and metadata["case"] == "a"
    cache.get(_key_parts([source]), create)
    assert cache.hits == 1


def test_a_lost_race_keeps_the_winners_entry(tmp_path, source):
    cache, other = ArrayCache(tmp_path / "cache"), ArrayCache(tmp_path / "cache")

    def create_while_another_process_writes():
        other.get(_key_parts([source]), Creator(2.0))  # finishes first
        return Creator(1.0)()

    arrays, _ = cache.get(_key_parts([source]), create_while_another_process_writes)
    np.testing.assert_array_equal(arrays["image"], 2.0)
    assert len(list((tmp_path / "cache").rglob("meta.json"))) == 1
    assert not list((tmp_path / "cache").rglob(".*"))


def test_bad_array_names_are_refused(tmp_path, source):
    cache = ArrayCache(tmp_path / "cache")
    with pytest.raises(CtxRestoreError, match=r"cache array name '\.\./x' is not valid"):
        cache.get(_key_parts([source]), lambda: ({"../x": np.zeros(2)}, {}))


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CTXRESTORE_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("CTXRESTORE_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "ctxrestore"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "ctxrestore"


def test_cache_in_environment_directory_is_used(monkeypatch, tmp_path, source):
    monkeypatch.setenv("CTXRESTORE_CACHE_DIR", str(tmp_path / "env_cache"))
    ArrayCache(default_cache_dir()).get(_key_parts([source]), Creator())
    assert len(list((tmp_path / "env_cache").rglob("image.npy"))) == 1


def test_fingerprint_is_absolute_and_names_missing_files(tmp_path, source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    [[path, size, mtime_ns]] = file_fingerprint([Path(source.name)])
    assert path == str(source) and size == 6 and mtime_ns == source.stat().st_mtime_ns
    with pytest.raises(CtxRestoreError, match=r"missing\.nii"):
        file_fingerprint([tmp_path / "missing.nii"])

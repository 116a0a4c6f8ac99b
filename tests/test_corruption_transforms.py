"""MONAI-style array and dictionary transforms over the swap."""

import numpy as np
import pytest
import torch
from corruption_checks import (
    assert_channels_moved_together,
    assert_is_permutation,
    distinct_images,
)
from monai.data import MetaTensor
from monai.transforms import Compose, CopyItemsd

from ctxrestore import ContextRestoration, ContextRestorationd
from ctxrestore.errors import CtxRestoreError


@pytest.mark.parametrize("spatial", [(24, 24), (12, 12, 12)])
@pytest.mark.parametrize("kind", ["tensor", "numpy", "meta"])
def test_array_transform_keeps_type_and_permutes(spatial, kind):
    # Distinct values: the channel check identifies each voxel by its channel-0 value.
    image = distinct_images(1, 2, spatial)[0]
    data = {"tensor": image, "numpy": image.numpy(), "meta": MetaTensor(image)}[kind]
    transform = ContextRestoration(num_swaps=5, patch_size=4)
    transform.set_random_state(0)
    out = transform(data)
    assert type(out) is type(data) and out.shape == data.shape
    out_t = torch.as_tensor(np.asarray(out))
    assert not torch.equal(out_t, image)
    assert_is_permutation(image[None], out_t[None])
    assert_channels_moved_together(image[None], out_t[None])


def test_seeding_reproduces_and_successive_calls_differ():
    image = torch.rand(1, 32, 32)
    first, second = ContextRestoration(8, 4), ContextRestoration(8, 4)
    first.set_random_state(3)
    second.set_random_state(3)
    a1, a2 = first(image), first(image)
    assert torch.equal(a1, second(image))
    assert not torch.equal(a1, a2)


def test_dictionary_form_applies_one_plan_to_every_key():
    image = torch.rand(1, 32, 32)
    label = (image * 7).round()
    pipeline = Compose(
        [
            CopyItemsd(keys="image", names="target"),
            ContextRestorationd(keys=["image", "label"], num_swaps=10, patch_size=6),
        ]
    )
    pipeline.set_random_state(5)
    out = pipeline({"image": image, "label": label})
    assert torch.equal(out["target"], image)  # the clean image stays the target
    assert not torch.equal(out["image"], image)
    assert torch.equal(out["label"], (out["image"] * 7).round())  # moved together


def test_dictionary_form_rejects_mismatched_shapes():
    transform = ContextRestorationd(keys=["a", "b"], num_swaps=2, patch_size=4)
    with pytest.raises(CtxRestoreError, match="'b' has spatial shape"):
        transform({"a": torch.rand(1, 16, 16), "b": torch.rand(1, 16, 12)})


def test_poisson_disc_placement_swaps_each_voxel_at_most_once():
    image = distinct_images(1, 2, (48, 48))[0]
    for transform in (
        ContextRestoration(num_swaps=6, patch_size=4, placement="poisson_disc"),
        ContextRestorationd(keys="image", num_swaps=6, patch_size=4, placement="poisson_disc"),
    ):
        transform.set_random_state(0)
        out = transform(image) if isinstance(transform, ContextRestoration) else transform(
            {"image": image})["image"]  # fmt: skip
        assert_is_permutation(image[None], out[None])
        assert_channels_moved_together(image[None], out[None])
        # 12 patches of 4x4 that no two swaps share: exactly their voxels moved.
        assert int((out != image).any(dim=0).sum()) == 12 * 16


def test_bad_configuration_fails_at_construction():
    with pytest.raises(ValueError, match="unknown placement 'grid'"):
        ContextRestorationd(keys="image", placement="grid")
    with pytest.raises(ValueError, match="T must be >= 1"):
        ContextRestoration(num_swaps=0)

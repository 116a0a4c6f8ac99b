"""What a network's weights know at the start of fine-tuning, by linear probes.

For the mask box head's localisation set-up on an abdomen phantom (`--phantom`), the network
is built exactly as `ctxrestore finetune` builds it (weights transferred, head random) and not
trained. Three linear probes (logistic regression, L-BFGS, features standardised on the training
pixels) are fitted on the labelled training slices of the split and scored on the test slices
(`--score-on val`: the validation slices, by which a user may choose between pretrainings),
as balanced accuracy:

- `organs`: the features the head sees (the decoder's output), one class per organ plus the
  background (5% of its pixels), i.e. how far a linear head is from the answer before any step;
  `organs_penultimate`: the same from the decoder's second-last level (upsampled), the
  features a fresh last level (`--fresh-decoder-levels 1`) starts from; `organs_encoder`:
  the same from the encoder's deepest stage (upsampled), what an encoder-only transfer
  (`--transfer-stages`) carries;
- `laterality`: left kidney against right kidney from the encoder's deepest stage (upsampled to
  the pixels), i.e. whether the weights already tell mirror-image organs apart;
- `x`: the same two kidneys from the pixel's column alone, the control (a phantom whose
  kidneys always lie on the same sides gives ~1).

Also printed: the head input's effective rank (participation ratio of its correlation matrix's
eigenvalues), and with `--fresh-head-steps N...` how far a fresh linear head gets on the head
input as it is (not standardised: what fine-tuning's new head reads), trained by Adam at
fine-tuning's peak learning rate for N full-batch steps (`organs_fresh_head_N`, balanced
accuracy as above): features that a standardised probe reads well but that are nearly
one-dimensional can take a fresh head many steps to use (docs/experiments.md 39).
`--batch-statistics` computes every feature with batch-norm's batch statistics, as fine-tuning's
first steps see them, instead of the running ones (random weights' running statistics are
their initial 0 and 1, which no fine-tuning step uses). `--init` takes `random` (one network
per `--seeds` value: build_network seeds the weights with the run seed) and pretraining
folders; `--fresh-decoder-levels N` builds the pretrained networks with their last N decoder
levels random, as fine-tuning with that option starts. docs/experiments.md 32 has the numbers:

    python benchmarks/feature_probe.py --init random /path/to/pretraining --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ctxrestore.data.phantoms import get_phantom, list_phantoms
from ctxrestore.engine.checkpoint import load_checkpoint
from ctxrestore.tasks.localize import organ_labels
from ctxrestore.tasks.training import FinetuneConfig, build_network, load_data, split_data

FINETUNE_LEARNING_RATE = FinetuneConfig.learning_rate  # the fresh head's Adam step size
BACKGROUND_SHARE = 0.05  # background pixels kept for the organ probe (it outnumbers organs)
CHUNK = 25  # slices per forward pass


def pixel_features(model, items, organ_values, kidneys, generator, batch_statistics=False):
    """Per-pixel features of the head input, the decoder's second-last level and the deepest
    encoder stage (organ probes), and of the deepest stage at kidney pixels (laterality
    probe), with their labels and the kidney pixels' columns. `batch_statistics`: batch-norm
    normalises each chunk of slices by its own statistics (training mode), as in fine-tuning."""
    model.train(batch_statistics)
    names = ("head", "penultimate", "encoder", "organ", "deep", "column", "left")
    parts = {name: [] for name in names}
    captured = {}
    hook = model.decoder.levels[-2].register_forward_hook(
        lambda module, inputs, output: captured.update(penultimate=output)
    )
    with torch.no_grad():
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            images = torch.stack([item["image"] for item in chunk])
            masks = torch.stack([item["mask"] for item in chunk]).squeeze(1)
            features = model.encoder.forward_features(images)
            head_input = model.decoder(features)
            labels = organ_labels(masks, organ_values)[:, 0]
            keep = (labels > 0) | (torch.rand(labels.shape, generator=generator) < BACKGROUND_SHARE)
            b, h, w = keep.nonzero(as_tuple=True)
            parts["head"].append(head_input[b, :, h, w])
            penultimate = F.interpolate(
                captured["penultimate"], size=images.shape[-2:], mode="nearest"
            )
            parts["penultimate"].append(penultimate[b, :, h, w])
            parts["organ"].append(labels[b, h, w])
            deep = F.interpolate(features[-1], size=images.shape[-2:], mode="nearest")
            parts["encoder"].append(deep[b, :, h, w])
            b, h, w = ((masks == kidneys[0]) | (masks == kidneys[1])).nonzero(as_tuple=True)
            parts["deep"].append(deep[b, :, h, w])
            parts["column"].append((w.float() / images.shape[-1] - 0.5).unsqueeze(1))
            parts["left"].append((masks[b, h, w] == kidneys[0]).long())
    hook.remove()
    return {name: torch.cat(values) for name, values in parts.items()}


def linear_probe(train_x, train_y, test_x, test_y, classes: int) -> float:
    """Balanced accuracy on the test pixels of a class-weighted multinomial logistic regression
    fitted on the training pixels."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    counts = torch.bincount(train_y, minlength=classes).float()
    class_weight = counts.sum() / (classes * counts.clamp_min(1))
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure():
        optimizer.zero_grad()
        logits = train_x @ weight + bias
        loss = F.cross_entropy(logits, train_y, weight=class_weight) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return balanced_accuracy((test_x @ weight + bias).argmax(1), test_y, classes)


def fresh_head_probe(train_x, train_y, test_x, test_y, classes: int, steps) -> dict[int, float]:
    """Balanced accuracy on the test pixels of a fresh linear head (PyTorch's default
    initialisation) after each number of `steps` of Adam at fine-tuning's peak learning rate
    on all training pixels, class-weighted, on the features as they are."""
    if not steps:
        return {}
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same fresh head for every init
        head = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=FINETUNE_LEARNING_RATE)
    counts = torch.bincount(train_y, minlength=classes).float()
    class_weight = counts.sum() / (classes * counts.clamp_min(1))
    scores = {}
    for step in range(1, max(steps) + 1):
        optimizer.zero_grad()
        F.cross_entropy(head(train_x), train_y, weight=class_weight).backward()
        optimizer.step()
        if step in steps:
            with torch.no_grad():
                scores[step] = balanced_accuracy(head(test_x).argmax(1), test_y, classes)
    return scores


def balanced_accuracy(predicted, truth, classes: int) -> float:
    """The mean recall over the classes that occur in `truth` (a class absent there has no
    recall, rather than a recall of 0)."""
    present = [c for c in range(classes) if (truth == c).any()]
    recalls = [
        ((predicted == c) & (truth == c)).sum().item() / (truth == c).sum().item() for c in present
    ]
    return sum(recalls) / len(present)


def effective_rank(x: torch.Tensor) -> float:
    """Participation ratio of the correlation matrix's eigenvalues: 1 (one direction) to C."""
    eigenvalues = torch.linalg.eigvalsh(torch.corrcoef(x.T).nan_to_num()).clamp_min(0)
    return (eigenvalues.sum() ** 2 / eigenvalues.square().sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", nargs="+", required=True, help="'random' and/or folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="random weights' seeds")
    localize_phantoms = [name for name in list_phantoms() if get_phantom(name).task == "localize"]
    parser.add_argument("--phantom", default="abdomen", choices=localize_phantoms, help="the data")
    parser.add_argument("--fraction", default="0.05")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument(
        "--fresh-decoder-levels", type=int, default=0, help="as ctxrestore finetune's, for folders"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--fresh-head-steps", type=int, nargs="*", default=[],
        help="also train a fresh linear head on the head input as it is, for these Adam steps",
    )  # fmt: skip
    parser.add_argument(
        "--score-on", default="test", choices=["test", "val"],
        help="the split the probes are scored on; 'val' is what a user can choose a pretraining by",
    )  # fmt: skip
    parser.add_argument(
        "--batch-statistics", action="store_true",
        help="batch-norm with batch statistics, as fine-tuning's steps (default: running ones)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = FinetuneConfig(
        task="localize",
        out=Path("unused"),  # nothing is written
        phantom=args.phantom,
        fraction=args.fraction,
        num_images=args.num_images,
        image_size=args.image_size,
        width=args.width,
        seed=args.split_seed,
        box_head="mask",
    )
    data = load_data(config, None)
    task = dataclasses.replace(data.task, box_head="mask")
    names, values = list(task.organ_names), list(task.organ_values)
    kidneys = (values[names.index("kidney_left")], values[names.index("kidney_right")])
    split = split_data(config, data)
    train_items = [data.items[i] for i in split.train]
    # The probes are scored on these slices: the test split, or the validation split (the labels a
    # user holds out, by which a pretraining may be chosen without touching the test set).
    test_items = [data.items[i] for i in getattr(split, args.score_on)]
    runs = [("random", seed) for seed in args.seeds if "random" in args.init]
    runs += [(init, args.split_seed) for init in args.init if init != "random"]
    for init, seed in runs:
        pretrained = (None, None) if init == "random" else load_checkpoint(Path(init))
        fresh = 0 if init == "random" else args.fresh_decoder_levels
        run_config = dataclasses.replace(config, init=init, seed=seed, fresh_decoder_levels=fresh)
        model, _, _ = build_network(run_config, task, data, pretrained)
        generator = torch.Generator().manual_seed(0)
        train = pixel_features(
            model, train_items, values, kidneys, generator, args.batch_statistics
        )
        test = pixel_features(model, test_items, values, kidneys, generator, args.batch_statistics)
        fresh_head = fresh_head_probe(
            train["head"], train["organ"], test["head"], test["organ"], len(values) + 1,
            args.fresh_head_steps,
        )  # fmt: skip
        row = {
            "init": init,
            "seed": seed,
            "scored_on": args.score_on,
            "fresh_decoder_levels": fresh,
            "organs": linear_probe(
                train["head"], train["organ"], test["head"], test["organ"], len(values) + 1
            ),
            "organs_penultimate": linear_probe(
                train["penultimate"],
                train["organ"],
                test["penultimate"],
                test["organ"],
                len(values) + 1,
            ),
            "organs_encoder": linear_probe(
                train["encoder"], train["organ"], test["encoder"], test["organ"], len(values) + 1
            ),
            "laterality": linear_probe(train["deep"], train["left"], test["deep"], test["left"], 2),
            "x": linear_probe(train["column"], train["left"], test["column"], test["left"], 2),
            **{f"organs_fresh_head_{steps}": score for steps, score in fresh_head.items()},
            "head_channels": train["head"].shape[1],
            "effective_rank": effective_rank(test["head"]),
            "train_pixels": len(train["organ"]),
        }
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()

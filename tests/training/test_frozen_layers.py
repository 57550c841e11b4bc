"""The pair stage on a partly frozen backbone (`--freeze-backbone --unfreeze-last N`): it trains exactly the last N
layers and the head, from cached outputs of the frozen layers that give the same embeddings as the whole network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contract.manifest import Normalization
from contract.torchscript import load_torchscript
from tests.training.conftest import train_command
from training.__main__ import main
from training.augment import IMAGENET_MEAN, IMAGENET_STD
from training.model import build_siamese
from training.train import Trainee, embed_images, frozen_outputs


@pytest.mark.parametrize("unfrozen", [0, 2])
def test_cached_frozen_outputs_give_the_whole_networks_embeddings(unfrozen: int) -> None:
    torch.manual_seed(0)
    net = build_siamese("resnet18", embedding_dim=16)
    trainee = Trainee(net, num_classes=3).eval()
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    normalization = Normalization(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    device = torch.device("cpu")
    first_trained = len(net.backbone) - unfrozen
    cached = frozen_outputs(net, first_trained, images, normalization, device, batch_size=2, amp=False)
    with torch.no_grad():
        from_cache, _ = trainee(cached, first_layer=first_trained)
    whole = embed_images(net, images, normalization, device, batch_size=2, amp=False)
    assert cached.shape[0] == 5 and (cached.shape[2:] == (1, 1)) == (unfrozen == 0)
    torch.testing.assert_close(from_cache, whole, rtol=1e-5, atol=1e-5)


def test_pair_stage_trains_only_the_unfrozen_layers(shapes_dataset: Path, tmp_path: Path) -> None:
    # No warm-up in either run, so the pair stage's weights are the ones kept and exported (a warm-up that the
    # pair stage did not beat on validation would be exported instead), and the untrained run exports the
    # initial weights, which both runs draw alike from the seed.
    untrained, paired = tmp_path / "untrained", tmp_path / "paired"
    main(train_command(shapes_dataset, untrained, "--classify-epochs", "0", "--epochs", "0"))
    main(train_command(shapes_dataset, paired, "--classify-epochs", "0", "--epochs", "2", "--loss", "bce",
                       "--freeze-backbone", "--unfreeze-last", "2"))
    before = load_torchscript(untrained / "shapes" / "model.pt", 2).state_dict()
    after = load_torchscript(paired / "shapes" / "model.pt", 2).state_dict()
    layers = len(build_siamese("resnet18").backbone)
    frozen = [name for name in before if name.startswith("backbone.") and int(name.split(".")[1]) < layers - 2]
    trained = [name for name in before if name.startswith(("projection.", f"backbone.{layers - 2}.",
                                                           f"backbone.{layers - 1}."))]
    assert frozen and trained
    assert all(torch.equal(before[name], after[name]) for name in frozen)  # BatchNorm statistics included
    changed = [name for name in trained if not torch.equal(before[name], after[name])]
    assert len(changed) > 0.9 * len(trained), sorted(set(trained) - set(changed))

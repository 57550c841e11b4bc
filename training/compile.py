"""`python -m training compile`: a model folder's backbone program compiled for this machine, into the cache the
service loads it from (contract/compiled.py).

The service compiles at start-up what it does not find (COMPILE=auto), so this is for doing it ahead of time: in a
container image's build (see the Dockerfile), or once for several replicas sharing a cache folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from contract.cache import default_cache_dir
from contract.compiled import CompileError, ensure_package, machine_tag
from contract.manifest import ManifestError, read_manifest
from training.errors import UsageError


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder holding manifest.json and its "
                        "backbone program")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: the device the package runs on (a "
                        "CUDA package runs on GPUs of the architecture it was compiled on)")
    parser.add_argument("--cache", type=Path, default=default_cache_dir(),
                        help="folder of compiled packages: the service's COMPILE_CACHE_DIR")
    parser.add_argument("--force", action="store_true", help="compile again even when the package exists")


def compile_model(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} but no CUDA device is visible")
    try:
        manifest = read_manifest(args.model)
        package, seconds = ensure_package(args.model, manifest, args.cache, device, force=args.force)
    except (ManifestError, CompileError) as error:
        raise UsageError(str(error)) from error
    done = "already there" if seconds is None else f"compiled in {seconds:.1f} s"
    print(f"{package}: {manifest.name} {manifest.version}'s backbone for {machine_tag(device)}, {done}")

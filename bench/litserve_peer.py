"""The peer of bench/peers.py: a model_store model's /similarity served by LitServe, from the same TorchScript
file and through the same preprocessing as siamcam (the contract's model-input path), so both give the same
scores for the same files.

`python -m bench.litserve_peer MODEL_DIR PORT` serves it on 127.0.0.1:PORT until SIGTERM: POST /similarity with
the multipart fields image1 and image2 answers {"score": ...}; GET /readyz answers "ok" once the model is loaded.
LitServe parses requests in its HTTP process and runs decode_request, batch, predict and unbatch in a worker
process, up to MAX_BATCH_SIZE requests a batch, waiting up to BATCH_TIMEOUT_S for a batch to fill (the settings
of issue 13's first measurement). Other layouts, for bench/fronts_bench.py's search for LitServe's best one here:
`--num-api-servers N` HTTP processes, `--fast-queue` (ZeroMQ queues), `--max-batch-size`, `--batch-timeout`.
Needs the `bench` extra: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import litserve
import torch

from contract.manifest import MODEL_FILE, read_manifest
from contract.preprocess import Preprocessing
from contract.torchscript import load_torchscript

MAX_BATCH_SIZE = 16  # as in issue 13's first measurement (siamcam's default was 16 then; it is 8 now)
BATCH_TIMEOUT_S = 0.005  # as in issue 13's first measurement: LitServe waits this long for a batch to fill
MAX_IMAGE_PIXELS = 40_000_000  # siamcam's default MAX_IMAGE_PIXELS

Pair = tuple[torch.Tensor, torch.Tensor]


class SimilarityAPI(litserve.LitAPI):
    def __init__(self, model_dir: Path, max_batch_size: int = MAX_BATCH_SIZE,
                 batch_timeout_s: float = BATCH_TIMEOUT_S) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s, api_path="/similarity")
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        manifest = read_manifest(self.model_dir)
        self.device = torch.device(device)
        self.module = load_torchscript(self.model_dir / MODEL_FILE, manifest.format_version, self.device)
        self.preprocessing = Preprocessing.of(manifest)

    # `request` stays unannotated: LitServe reads that annotation to type the endpoint's body, and without one
    # it parses the multipart form in its HTTP process and hands the form (a starlette FormData) over here.
    def decode_request(self, request, **kwargs: Any) -> Pair:  # type: ignore[no-untyped-def]
        """The multipart form's two uploads as the model's inputs, exactly as siamcam makes them."""
        first, second = (self.preprocessing.model_input(request[field].file.read(), field, MAX_IMAGE_PIXELS)
                         for field in ("image1", "image2"))
        return first, second

    def batch(self, inputs: list[Pair]) -> Pair:
        return (torch.stack([first for first, _ in inputs]).to(self.device),
                torch.stack([second for _, second in inputs]).to(self.device))

    def predict(self, x: Pair, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(*x)

    def unbatch(self, output: torch.Tensor) -> list[float]:
        return output.cpu().tolist()

    def encode_response(self, output: float, **kwargs: Any) -> dict[str, float]:
        return {"score": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="a model folder of model_store (manifest.json, model.pt)")
    parser.add_argument("port", type=int)
    parser.add_argument("--num-api-servers", type=int, default=None,
                        help="HTTP processes (LitServe's num_api_servers; by default LitServe's own choice)")
    parser.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ queues between processes")
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE)
    parser.add_argument("--batch-timeout", type=float, default=BATCH_TIMEOUT_S,
                        help="seconds LitServe waits for a batch to fill")
    args = parser.parse_args()
    server = litserve.LitServer(SimilarityAPI(args.model_dir, args.max_batch_size, args.batch_timeout),
                                accelerator="auto", devices=1, timeout=120, healthcheck_path="/readyz",
                                fast_queue=args.fast_queue)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning",
               num_api_servers=args.num_api_servers)


if __name__ == "__main__":
    main()

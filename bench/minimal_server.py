"""The floor of bench/fronts_bench.py's CPU per request: the least a Python server must do for a /similarity pair.

A Starlette app with no model, middleware, logging or metrics: it parses the multipart body and makes both model
pictures exactly as siamcam's fronts do (`contract.picture.model_picture`: Pillow's draft decode, then the resize),
and answers a constant score. What siamcam spends beyond it per request is its serving: the fronts' middleware,
routing, logging and metrics, the hand-offs to threads and to the model's process, and the model.

    .venv/bin/python -m bench.minimal_server MODEL_DIR PORT    # until SIGTERM; GET /readyz answers 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from app.settings import Settings
from contract.manifest import read_manifest
from contract.picture import model_picture

MAX_IMAGE_PIXELS: int = Settings.model_fields["max_image_pixels"].default  # siamcam's default MAX_IMAGE_PIXELS


def minimal_app(input_size: tuple[int, int]) -> Starlette:
    async def similarity(request: Request) -> JSONResponse:
        form = await request.form()
        for field in ("image1", "image2"):
            model_picture(await form[field].read(), field, MAX_IMAGE_PIXELS, input_size)  # type: ignore[union-attr]
        return JSONResponse({"score": 0.5})

    async def readyz(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/similarity", similarity, methods=["POST"]), Route("/readyz", readyz)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="the model whose input size the pictures take")
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    manifest = read_manifest(args.model_dir)
    uvicorn.run(minimal_app(tuple(manifest.input_size)), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()

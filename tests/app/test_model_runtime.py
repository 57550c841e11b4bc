"""How the service runs its model: frozen for serving (same scores as the file), and on the one thread that
runs torch with several threads (app/torch_threads.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from app.model import load_model
from app.torch_threads import MODEL_TORCH_THREADS, model_thread_executor, single_threaded_pool
from contract.torchscript import load_torchscript
from tests.app.conftest import TEST_MODEL_NAME


def test_the_served_model_is_frozen_and_scores_as_its_file(model_store: Path) -> None:
    served = load_model(model_store / TEST_MODEL_NAME, "cpu")
    as_in_its_file = load_torchscript(served.path, served.manifest.format_version)
    assert list(served.module.parameters()) == [], "the weights should be constants of the frozen module"
    assert list(as_in_its_file.parameters()), "the file itself holds parameters"
    generator = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(4, 3, *served.input_size, generator=generator) for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(served.module(x1, x2), as_in_its_file(x1, x2), rtol=0, atol=1e-5)
        features = served.module.features(x1)
        torch.testing.assert_close(features, as_in_its_file.features(x1), rtol=0, atol=1e-4)
    # the explainers differentiate the score by the feature maps: that still works on the frozen module
    features = features.clone().requires_grad_()
    embeddings = served.module.embed(features)
    served.module.similarity(embeddings, embeddings.detach()).sum().backward()
    assert features.grad is not None and bool(torch.isfinite(features.grad).all())
    assert float(features.grad.abs().max()) > 0


def test_only_the_model_thread_runs_torch_on_several_threads() -> None:
    model_thread = model_thread_executor()
    image_threads = single_threaded_pool(2, "images")
    try:
        assert model_thread.submit(torch.get_num_threads).result() == MODEL_TORCH_THREADS
        assert list(image_threads.map(lambda _: torch.get_num_threads(), range(4))) == [1, 1, 1, 1]
        # a thread of either kind keeps its own count, whatever the other sets afterwards
        assert model_thread.submit(torch.get_num_threads).result() == MODEL_TORCH_THREADS
    finally:
        model_thread.shutdown()
        image_threads.shutdown()

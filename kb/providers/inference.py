"""The one thread every local model's forward pass runs on, whatever the runtime.

On a new calling thread (and under ASGI each request is one) torch's OpenMP runtime builds
a new thread team: a query embedding took 40 ms that way against 18 ms here. One thread
also serialises concurrent passes, which on a CPU would only contend for the same cores.
ONNX Runtime keeps its own pool, so for it the thread only serialises.
"""

from __future__ import annotations

import importlib.util

from kb.ops.worker_threads import WorkerThreads


def _torch_threads_set() -> None:
    from django.conf import settings

    # torch is an optional extra: without it there is no OpenMP team to size.
    if settings.KB_TORCH_THREADS and importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(settings.KB_TORCH_THREADS)


inference_thread = WorkerThreads(max_workers=1, name="inference", setup=_torch_threads_set)


def torch_missing_message(feature: str) -> str:
    """What to install for a feature that needs PyTorch, said the same way everywhere."""
    return (f"{feature} needs PyTorch and sentence-transformers, which the default install "
            "leaves out: pip install -e '.[torch]'")

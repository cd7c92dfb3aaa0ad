"""Batches made ahead in a thread, handed over to the training stream without a host sync.

    for images, labels, indices in prefetched(make_batches(), depth=2, name="fastkd-nvjpeg"):
        ...   # the current CUDA stream already waits for the batch's event

`items` yields (images, labels, indices, done): tensors the producer made (on CUDA, on a side
stream of its own) and `done`, a CUDA event recorded after them on that stream, or None on the
CPU. A daemon thread drains `items` up to `depth` batches ahead of the consumer. Each batch is
handed over by making the consumer's current stream wait for `done` (the GPU waits, the host
does not) and recording the tensors on that stream, so their memory is not reused early. An
exception in the producer is raised in the consumer; leaving the loop early stops the thread.
Used by the torch (nvJPEG) and nvimgcodec backends.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import torch


def prefetched(items: Iterable[tuple], depth: int, name: str) -> Iterator[tuple]:
    """(images, labels, indices) of each item of `items`, made `depth` ahead in a thread."""
    ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(None)
        except BaseException as error:  # re-raised in the consumer
            put(error)

    thread = threading.Thread(target=work, daemon=True, name=name)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            images, labels, indices, done = item
            if done is not None:  # the step's stream waits for the batch on the GPU, not the host
                current = torch.cuda.current_stream(images.device)
                current.wait_event(done)
                images.record_stream(current)
                labels.record_stream(current)
            yield images, labels, indices
    finally:
        stop.set()
        thread.join(timeout=5)

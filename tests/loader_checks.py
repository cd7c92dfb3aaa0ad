"""Checks shared by the loader tests (no tests here): one whole pass, and a pass that must not
synchronise with the host."""

from __future__ import annotations

import torch


def one_pass(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, indices) of one pass of a loader built with return_indices, concatenated."""
    out = [(x, y, i) for x, y, i in loader]
    return tuple(torch.cat([b[k] for b in out]) for k in range(3))


def assert_pass_without_host_sync(loader) -> None:
    """Epoch 0 read twice: once for reference sums, once under sync debug mode "error" (any host
    sync raises) using each batch on the current stream; the sums agree, so each batch was ready
    there (the current stream waited for the loader's side stream, the host never did)."""
    ref = one_pass(loader)[0].float().sum(dim=(1, 2, 3))
    loader.set_epoch(0)
    sums = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y, _ in loader:
            sums.append(x.float().sum(dim=(1, 2, 3)) + y.float() * 0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.allclose(torch.cat(sums), ref, rtol=1e-3, atol=1.0)

"""Checks shared by the loader tests (no tests here): one whole pass, and a pass that must not
synchronise with the host."""

from __future__ import annotations

import numpy as np
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


def write_textured_jpegs(src, per_split: dict[str, int], classes: int, sides: tuple[int, int], seed: int,
                         grey_every: int = 0, progressive_every: int = 0) -> None:
    """An ImageNet-style folder src/<split>/n0000000<c>/imgKKK.JPEG of gradient-and-noise images
    (sides: the inclusive range of each side in px). grey_every = k > 0: every k-th image (the
    3rd of each k) is greyscale; progressive_every = k: every k-th one (the 1st) progressive."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    n = 0
    for split, per_class in per_split.items():
        for c in range(classes):
            folder = src / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
                y, x = np.mgrid[0:h, 0:w]
                rgb = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1) + rng.integers(0, 40, (h, w, 3))
                image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
                if grey_every and n % grey_every == 3:
                    image = image.convert("L")
                progressive = bool(progressive_every) and n % progressive_every == 1
                image.save(folder / f"img{k:03d}.JPEG", quality=90, progressive=progressive)
                n += 1

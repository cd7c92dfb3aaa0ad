"""Write the embedded demo data: scikit-learn's handwritten digits as an ImageNet-style folder.

    fastkd demo-data demo/                 # demo/{train,val}/digit0..digit9/*.JPEG, 48x48 RGB
    fastkd pack demo/ packed/demo --classes all

1797 real 8x8 digit scans ship inside the scikit-learn wheel (nothing is downloaded). Each is
upscaled (bicubic) to --size px, given a mild per-image colour tint so the three channels differ,
and saved as a JPEG. Every 5th image (by dataset index) goes to val/, the rest to train/:
1437 train and 360 val images. Deterministic: the same command writes the same bytes.
Class folders are named digit0..digit9 (not WNIDs; their manifest `imagenet_index` is null).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from fastkd.errors import FastKDError
from fastkd.notes import show

VAL_EVERY = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="folder to create (train/ and val/ inside)")
    parser.add_argument("--size", type=int, default=48, help="side of the square images in px (default 48)")
    parser.add_argument("--overwrite", action="store_true", help="write into OUT even if it holds files")


def write_demo(out, size: int = 48, quality: int = 95) -> dict[str, int]:
    """Write the folder; returns images per split."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if not 8 <= size <= 1024:
        raise FastKDError(f"--size {size}: expected 8..1024 px")
    out = Path(out)
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    rng = np.random.default_rng(0)
    # per-image tint: ink and paper colours near black-on-white, shifted per channel
    ink = rng.uniform(0.0, 0.35, size=(len(images), 3)).astype(np.float32)
    paper = rng.uniform(0.75, 1.0, size=(len(images), 3)).astype(np.float32)
    counts = {"train": 0, "val": 0}
    for i, (image, label) in enumerate(zip(images, digits.target)):
        split = "val" if i % VAL_EVERY == 0 else "train"
        rgb = paper[i] + (ink[i] - paper[i]) * image[..., None]  # (8, 8, 3), ink where the digit is
        pil = Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB").resize((size, size), Image.BICUBIC)
        folder = out / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        (folder / f"digit{label}_{i:04d}.JPEG").write_bytes(buf.getvalue())
        counts[split] += 1
    return counts


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FastKDError(f"{out} exists and is not empty; pass --overwrite to write into it")
    counts = write_demo(out, size=args.size)
    show(f"wrote {counts['train']} train + {counts['val']} val images of 10 digit classes "
         f"({args.size}x{args.size} RGB JPEG) to {out}")
    show(f"next: fastkd pack {out} PACKED --classes all")
    return 0

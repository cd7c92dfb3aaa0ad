"""`folder` backend: the usual baseline, torchvision ImageFolder + DataLoader + PIL transforms.

Reads the original ImageNet-style source (`manifest["source"]`, or the `source=` option) with
PIL in DataLoader worker processes: train RandomResizedCrop(r, scale 0.08-1, ratio 3/4-4/3) +
RandomHorizontalFlip; val Resize(int(r / 0.875)) + CenterCrop(r); PILToTensor (uint8), then
normalisation on the device like every backend. Only the manifest's classes are read, labelled
in the manifest's order, and the files the packer skipped are left out, so sample i is pack
index i (checked: the file count must match the manifest). Order and sharding: sharding.py.
Determinism: same seed -> same order, crops and flips, on any number of workers: torchvision's
transforms draw from torch's global RNG, which is seeded per sample from (seed, epoch, index)
right before its transform (in the worker, inside `torch.random.fork_rng`). So a pass started at
batch k (`set_epoch(e, start_batch=k)`) yields the same batches, pixels included, as the tail of
the full pass, and the files of batches 0..k-1 are never opened.
Given crops (`set_crop_fn(fn)`, a teacher cache's views): train images are cropped at
`fn(epoch, index, height, width)` with torchvision's resized_crop (antialiased, the same resize
as RandomResizedCrop) and flipped as it says. The source image may be larger than its packed copy
(`fastkd pack --max-side`); a box given in the packed image's pixels is then scaled by crop_fn
(fastkd.teacher_cache does), so the same part of the picture is seen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from fastkd.data.contract import Loader, LoaderSpec, PassSampler
from fastkd.data.spec import FLIP_PROB, TRAIN_RATIO, TRAIN_SCALE, VAL_CROP_RATIO
from fastkd.data.sharding import derive_seed
from fastkd.errors import FastKDError


class ManifestImageFolder(datasets.ImageFolder):
    """ImageFolder over the manifest's classes (label = manifest label), minus skipped files."""

    def __init__(self, root: Path, manifest: dict, split: str, transform):
        self._wnids = [c["wnid"] for c in manifest["classes"]]
        self._skipped = {Path(s["path"]).as_posix() for s in manifest.get("skipped", []) if s.get("split") == split}
        super().__init__(str(root), transform=transform)
        top = Path(root)
        self.samples = [(p, y) for p, y in self.samples
                        if Path(p).relative_to(top.parent).as_posix() not in self._skipped]
        self.imgs, self.targets = self.samples, [y for _, y in self.samples]

    def find_classes(self, directory):
        missing = [w for w in self._wnids if not Path(directory, w).is_dir()]
        if missing:
            raise FastKDError(f"{directory}: no folder for class(es) {missing[:5]} of the manifest")
        return list(self._wnids), {w: i for i, w in enumerate(self._wnids)}


class _Indexed(torch.utils.data.Dataset):
    """Item (epoch, i) -> (uint8 [3,r,r], label, i); train transforms seeded from (seed, epoch, i)."""

    def __init__(self, folder: ManifestImageFolder, seed: int, train: bool, crop_fn=None):
        self.folder, self.seed, self.train, self.crop_fn = folder, seed, train, crop_fn

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, item):
        epoch, i = item
        if self.train and self.crop_fn is not None:  # a given box: no randomness
            path, label = self.folder.samples[i]
            image = self.folder.loader(path)
            (top, left, h, w), flip = self.crop_fn(epoch, i, image.height, image.width)
            r = self.folder.transform.resolution
            image = TF.resized_crop(image, top, left, h, w, [r, r], antialias=True)
            image = TF.hflip(image) if flip else image
            return TF.pil_to_tensor(image), label, i
        if not self.train:  # no randomness in the val transform
            image, label = self.folder[i]
            return image, label, i
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG as it was
            torch.manual_seed(derive_seed(self.seed, epoch, i, 3))
            image, label = self.folder[i]
        return image, label, i


class FolderLoader(Loader):
    backend = "folder"
    supports_crop_fn = True

    def __init__(self, spec: LoaderSpec, manifest: dict, source: str | None = None):
        super().__init__(spec, manifest)
        if manifest.get("params", {}).get("layout") == "labels":
            raise FastKDError(
                f"folder backend: {spec.data_dir} was packed from a --labels CSV "
                f"({manifest['params'].get('labels')}); the folder backend reads the ImageNet layout "
                "(train/<class>/, val/<class>/) only: use --backend torch, dali or ffcv"
            )
        source = source or manifest.get("source")
        if not source:
            raise FastKDError("folder backend: the manifest names no source folder; pass source=PATH")
        root = Path(source) / spec.split
        if not root.is_dir():
            raise FastKDError(f"folder backend: {root} is not a directory (source of the pack moved? pass source=PATH)")
        self._transform = _Transform(spec.train, spec.resolution)
        self.folder = ManifestImageFolder(root, manifest, spec.split, self._transform)
        if len(self.folder) != self.num_samples:
            raise FastKDError(f"folder backend: {root} has {len(self.folder)} usable images of the manifest's "
                              f"classes, the manifest says {self.num_samples}: the source changed since packing")
        self._sampler = PassSampler()
        self.crop_fn = None
        self._make_loader()

    def _make_loader(self) -> None:
        s = self.spec
        # its own generator for the workers' base seed, so a pass does not draw from torch's global RNG
        self._loader = torch.utils.data.DataLoader(
            _Indexed(self.folder, s.seed, s.train, self.crop_fn), batch_sampler=self._sampler,
            num_workers=s.num_workers, generator=torch.Generator().manual_seed(s.seed),
            pin_memory=s.device.type == "cuda")

    def _use_crop_fn(self, crop_fn) -> None:
        self.crop_fn = crop_fn
        self._make_loader()  # workers copy the dataset when they start

    def _pass(self, epoch: int, start: int):
        s = self.spec
        self._transform.resolution = self.resolution  # workers start per pass and copy it
        # batches before `start` are never handed to the workers: their files are not opened
        self._sampler.items = [[(epoch, i) for i in b.tolist()] for b in self._pass_batches(epoch, start)]
        for images, labels, indices in self._loader:
            images = images.to(s.device, non_blocking=True)
            yield self._output(self.normalize(images), labels, indices.numpy())


class _Transform:
    """PIL image -> uint8 [3,r,r]; `resolution` is read at call time (progressive resizing)."""

    def __init__(self, train: bool, resolution: int):
        self.train, self.resolution = train, resolution
        self._built: tuple | None = None

    def __call__(self, image):
        r = self.resolution
        if self._built is None or self._built[0] != r:
            if self.train:
                ops = [T.RandomResizedCrop(r, scale=TRAIN_SCALE, ratio=TRAIN_RATIO, antialias=True),
                       T.RandomHorizontalFlip(FLIP_PROB)]
            else:
                ops = [T.Resize(int(r / VAL_CROP_RATIO), antialias=True), T.CenterCrop(r)]
            self._built = (r, T.Compose(ops + [T.PILToTensor()]))
        return self._built[1](image)

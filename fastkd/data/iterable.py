"""Any iterable of (images, labels) batches as a fastkd loader: what the Python API trains on.

    train = IterableLoader(my_dataloader, num_classes=10)      # or classes=["cat", "dog", ...]
    for images, labels in train: ...   # on the trainer's device, channels_last, images float

The trainer asks a loader for `len()` (steps per epoch: the schedule needs it), `set_epoch`,
`set_resolution`, `num_classes` and `manifest["classes"]`. A plain iterable has none of those, so
this wrapper supplies them: `len()` from the iterable (or `steps_per_epoch`), `set_epoch` passed on
to the iterable or its sampler when they have one (torch's DistributedSampler), resolution changes
ignored (the user's pipeline owns its transforms), and a class list made from `classes` or
`num_classes`. Batches are moved to `device` without blocking, images as floating point in
channels_last, labels as int64 [B].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fastkd.errors import FastKDError


class IterableLoader:
    """A fastkd loader over `batches` (see the module docstring)."""

    supports_start_batch = False  # a resumed epoch re-reads and skips the batches done

    def __init__(self, batches: Iterable, *, num_classes: int | None = None, classes: Sequence[str] | None = None,
                 steps_per_epoch: int | None = None, device: torch.device | str = "cpu",
                 name: str = "IterableLoader"):  # fmt: skip
        """`name` starts every error message: the argument the batches came in, e.g. "fit(train=...)"."""
        self.name = name
        if classes is None and num_classes is None:
            raise FastKDError(f"{name}: pass num_classes=K or classes=[names]")
        names = [str(c) for c in classes] if classes is not None else [f"class{i}" for i in range(int(num_classes))]
        if num_classes is not None and len(names) != int(num_classes):
            raise FastKDError(f"{name}: {len(names)} class names but num_classes={num_classes}")
        if len(names) < 2:
            raise FastKDError(f"{name}: need at least 2 classes, got {len(names)}")
        if steps_per_epoch is None:
            try:
                steps_per_epoch = len(batches)  # type: ignore[arg-type]
            except TypeError:
                raise FastKDError(
                    f"{name}: the batches have no len(); pass steps_per_epoch= (the schedule needs it)"
                ) from None
        self.batches, self.steps = batches, int(steps_per_epoch)
        self.device = torch.device(device)
        self.num_classes = len(names)
        self.manifest = {"classes": [{"label": i, "wnid": n, "name": n, "imagenet_index": None}
                                     for i, n in enumerate(names)]}  # fmt: skip
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for owner in (self.batches, getattr(self.batches, "sampler", None), getattr(self.batches, "batch_sampler", None)):
            if owner is not None and hasattr(owner, "set_epoch"):
                owner.set_epoch(self.epoch)
                return

    def set_resolution(self, resolution: int) -> None:
        pass  # the user's pipeline decides its image size

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i >= self.steps:
                break
            images, labels = self.check_batch(i, batch)
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield images, labels.to(self.device, dtype=torch.int64, non_blocking=True)
        self.epoch += 1

    def check_batch(self, i: int, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of batch `i`, where they are; FastKDError naming self.name when it is
        not a pair, images are not float [B, 3, H, W] (channels-last [B, H, W, 3] said so), labels
        are not [B] or (on the host, where it costs no device sync) outside 0..num_classes-1."""
        try:
            images, labels = batch[0], batch[1]
        except (TypeError, IndexError, KeyError):
            raise FastKDError(f"{self.name}: batch {i} is not (images, labels): {type(batch).__name__}") from None
        shape = tuple(getattr(images, "shape", ()))
        if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.is_floating_point()):
            raise FastKDError(f"{self.name}: batch {i} images must be a float tensor [B, 3, H, W], got "
                              f"{getattr(images, 'dtype', type(images).__name__)} {shape}")  # fmt: skip
        if shape[-1] in (1, 3) and shape[1] not in (1, 3):  # HWC: torch convolutions read dim 1 as channels
            raise FastKDError(f"{self.name}: batch {i} images must be [B, 3, H, W], got [B, H, W, {shape[-1]}] "
                              f"= {list(shape)}; use images.permute(0, 3, 1, 2)")  # fmt: skip
        labels = torch.as_tensor(labels)
        if labels.shape != (images.shape[0],):
            raise FastKDError(f"{self.name}: batch {i} labels must be [B] = [{images.shape[0]}], "
                              f"got {tuple(labels.shape)}")  # fmt: skip
        if labels.device.type == "cpu" and labels.numel() and (
            int(labels.min()) < 0 or int(labels.max()) >= self.num_classes
        ):
            raise FastKDError(f"{self.name}: batch {i} has labels outside 0..{self.num_classes - 1}")
        return images, labels

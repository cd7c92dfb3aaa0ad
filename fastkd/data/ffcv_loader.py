"""`ffcv` backend: the split's .beton through FFCV's Loader (JIT-compiled decode + crop + flip on CPU).

Pipeline: RandomResizedCropRGBImageDecoder (train) / CenterCropRGBImageDecoder(ratio 0.875) (val:
the same integer box as transforms.center_crop_box) -> RandomHorizontalFlip (train) -> ToTensor
-> ToDevice (cuda only) -> ToTorchImage(channels_last), then `Loader.normalize` (one table-lookup
pass on CPU, float arithmetic on CUDA), which also copies out of FFCV's reused batch buffers.
FFCV resizes with OpenCV INTER_AREA (the other backends: antialiased bilinear).

Order: `order="random"` (default for train) and `"sequential"` use fastkd's own sharding
(sharding.py, remainder rules there) through FFCV's `indices`/traversal hook, identical to the
torch and folder backends. FFCV's own `distributed=True` is not used: it builds a torch
DistributedSampler, which needs an initialised torch.distributed process group and pads the last
rank's part with repeated samples. `order="quasi_random"` (data larger than RAM; reads page by
page) is FFCV's QuasiRandom: single process only (FFCV does not implement it distributed) and it
needs `os_cache=False`.

Mid-epoch start: `set_epoch(e, start_batch=k)` hands FFCV the pass order without its first
k * batch_size samples (random/sequential), so batches k.. hold the same samples as in the full
pass and the skipped ones are never read or decoded; their crops and flips differ (unseeded, see
below). quasi_random cannot start mid-pass (FastKDError).

Determinism: the sample order is a function of (seed, epoch). quasi_random: FFCV's order is
seeded but reshuffles its page table in place at every epoch, so epoch e's order depends on the
epochs run before it in the process (a resumed run gets other orders). Crops and flips are NOT
reproducible: FFCV draws them with numba's per-thread np.random inside a parallel loop, unseeded,
and which thread handles a sample varies.

Side effects of FFCV undone here: it sets torch's intra-op thread count to its num_workers
(restored every batch). Changing the resolution recompiles the decoder (seconds).
"""

from __future__ import annotations

import numpy as np
import torch

from fastkd.data.contract import Loader, LoaderSpec
from fastkd.data.spec import FLIP_PROB, TRAIN_RATIO, TRAIN_SCALE, VAL_CROP_RATIO
from fastkd.data.sharding import epoch_indices
from fastkd.errors import FastKDError

ORDERS = ("random", "sequential", "quasi_random")


class _ShardOrder:
    """FFCV TraversalOrder stand-in: this rank's indices of an epoch (sharding.py)."""

    def __init__(self, spec: LoaderSpec, num_samples: int, shuffle: bool):
        self.spec, self.num_samples, self.shuffle = spec, num_samples, shuffle
        self.skip = 0  # samples of the pass not to read (start_batch * batch_size), set per pass

    def sample_order(self, epoch: int) -> np.ndarray:
        s = self.spec
        order = epoch_indices(self.num_samples, self.shuffle, s.seed, epoch, s.rank, s.world_size, s.drop_last)
        if s.drop_last:  # cut the partial batch here: FFCV only cuts the order to its len() from epoch 0
            order = order[:len(order) // s.batch_size * s.batch_size]
        # FFCV batches whatever order it gets from its start, so cutting whole batches off the
        # front keeps the later batches as they were, and FFCV never reads the cut samples.
        return order[self.skip:].astype(np.uint64)


class _Recorded:
    """Wraps a traversal order and keeps the order FFCV asked for last (QuasiRandom mutates its
    page table on every call, so asking it again would not give the same order)."""

    def __init__(self, inner):
        self.inner, self.last = inner, None

    def sample_order(self, epoch: int) -> np.ndarray:
        self.last = self.inner.sample_order(epoch)
        return self.last


class FFCVLoader(Loader):
    backend = "ffcv"

    def __init__(self, spec: LoaderSpec, manifest: dict, beton: str, os_cache: bool = True,
                 order: str | None = None, batches_ahead: int = 3):
        super().__init__(spec, manifest)
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader as FFCVBaseLoader
        from ffcv.loader import OrderOption
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        order = order or ("random" if spec.train else "sequential")
        if order not in ORDERS:
            raise FastKDError(f"ffcv order must be one of {ORDERS}, not {order!r}")
        if order == "quasi_random" and spec.world_size > 1:
            raise FastKDError("ffcv order='quasi_random' does not work with world_size > 1 (FFCV "
                              "implements QUASI_RANDOM for a single process only); use order='random' "
                              "(needs the data in RAM: os_cache=True) or the dali backend")
        if order == "quasi_random" and os_cache:
            raise FastKDError("ffcv order='quasi_random' needs os_cache=False (it exists to read page "
                              "by page when the data does not fit in RAM)")
        self.order = order
        if order == "quasi_random":
            self.supports_start_batch = False
            self.why_no_start_batch = ("order='quasi_random' draws FFCV's page-shuffled order, which depends on "
                                       "the epochs run before it in the process; use order='random'")
        r = spec.resolution
        r_train = (r, r)
        if spec.train:
            self._decoder = RandomResizedCropRGBImageDecoder(r_train, scale=TRAIN_SCALE, ratio=TRAIN_RATIO)
            image_ops = [self._decoder, RandomHorizontalFlip(FLIP_PROB)]
        else:
            self._decoder = CenterCropRGBImageDecoder(r_train, ratio=VAL_CROP_RATIO)
            image_ops = [self._decoder]
        image_ops.append(ToTensor())
        label_ops = [IntDecoder(), ToTensor(), Squeeze()]
        if spec.device.type == "cuda":
            image_ops.append(ToDevice(spec.device, non_blocking=True))
            label_ops.append(ToDevice(spec.device, non_blocking=True))
        image_ops.append(ToTorchImage(channels_last=True))
        self._shard_order = _ShardOrder(spec, self.num_samples, shuffle=spec.train)
        if order == "quasi_random":
            ffcv_order, indices = OrderOption.QUASI_RANDOM, None
        else:  # start from the epoch-0 part; our traversal replaces FFCV's below
            ffcv_order, indices = OrderOption.SEQUENTIAL, self._shard_order.sample_order(0)
        try:
            self._loader = FFCVBaseLoader(
                beton, batch_size=spec.batch_size, num_workers=spec.num_workers, os_cache=os_cache,
                order=ffcv_order, distributed=False, seed=spec.seed, indices=indices,
                pipelines={"image": image_ops, "label": label_ops}, drop_last=spec.drop_last,
                batches_ahead=batches_ahead)
        except (ValueError, KeyError, OSError) as error:
            raise FastKDError(f"{beton}: FFCV cannot open it ({error}); re-run `fastkd pack`") from None
        inner = self._shard_order if order != "quasi_random" else self._loader.traversal_order
        self._loader.traversal_order = _Recorded(inner)
        self._built_resolution = r

    def __len__(self) -> int:
        if self.order == "quasi_random":
            return len(self._loader)
        return super().__len__()

    def _sync_resolution(self) -> None:
        if self.resolution != self._built_resolution:
            # the output size is a constant of the JIT-compiled decoder: recompile (a few seconds)
            self._decoder.output_size = (self.resolution, self.resolution)
            self._loader.generate_code()
            self._built_resolution = self.resolution

    def _pass(self, epoch: int, start: int):
        self._shard_order.skip = start * self.spec.batch_size
        self._sync_resolution()
        self._loader.next_epoch = epoch
        B = self.spec.batch_size
        threads = torch.get_num_threads()
        batches = iter(self._loader)
        torch.set_num_threads(threads)  # FFCV sets torch's thread count to its num_workers; undo
        order = self._loader.traversal_order.last
        for b, (images, labels) in enumerate(batches):
            if torch.get_num_threads() != threads:  # FFCV's loader thread set it again
                torch.set_num_threads(threads)
            images = images if images.device == self.spec.device else images.to(self.spec.device)
            out = self.normalize(images)
            indices = order[b * B:b * B + len(labels)].astype(np.int64)
            yield self._output(out, labels, indices)


def available() -> str | None:
    """None when FFCV imports, else why not."""
    try:
        import ffcv.loader  # noqa: F401
    except Exception as error:  # ImportError, or OSError from a missing libturbojpeg/OpenCV
        return f"{type(error).__name__}: {error}"
    return None



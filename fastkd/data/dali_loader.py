"""`dali` backend: the split's WebDataset shards decoded and augmented by NVIDIA DALI.

Pipeline (one per pass, built for that epoch and resolution):
  JPEG bytes (reader, see below) -> train, shuffle="global": decoders.image_slice of the box
  transforms.train_boxes draws from (seed, epoch, pack index) (the torch backend's boxes and
  flips; the image size comes from the JPEG header, `jpeg_size`), fed with the bytes;
  train, shuffle="reader": decoders.image_random_crop (DALI's RNG; area 0.08-1, aspect
  3/4-4/3); both decode only the window -> resize r x r;  val:
  decoders.image_slice of the centre square int(0.875 * shorter side) at ((H-s)//2, (W-s)//2),
  the box of transforms.center_crop_box -> resize r x r  (antialiased linear)
  -> crop_mirror_normalize (flip p=0.5 on train, ImageNet mean/std, NHWC, fp16 or fp32)
Device: on CUDA the decoders run with device="mixed" (nvJPEG, plus the A100/H100 hardware JPEG
decoder for `hw_decoder_load` of the batch) and everything after on the GPU; on CPU the same
operators run with device="cpu" in a pipeline built with device_id=None. NHWC viewed as NCHW is
exactly torch.channels_last. DALI has no bfloat16: bf16 runs take fp32 from DALI and cast.

Reading, two ways (`shuffle=`):
- "global" (train default): fastkd's sharding.py order (a permutation of the whole split from
  (seed, epoch), rank r takes every W-th sample; remainder as documented there: drop_last=True
  cuts N % W and partial batches, drop_last=False drops nothing), the JPEG bytes read through the
  shards' index files and fed with `fn.external_source`. Identical order to ffcv/torch/folder.
- "reader" (val always; train on request): `fn.readers.webdataset` with shard_id=rank,
  num_shards=world_size. DALI splits the epoch's sample list into W contiguous parts (part k =
  samples floor(N*k/W) .. floor(N*(k+1)/W)-1, sizes differ by at most one); pad_last_batch keeps a
  rank's last batch inside its part and the iterator strips the padding. drop_last=False: every
  sample exactly once per epoch across ranks, last batches partial. drop_last=True: every rank
  yields (N // W) // B batches (equal on all ranks), the rest of its part is not read that epoch.
  DALI cannot permute a tar dataset globally: per epoch it shuffles the order of the tar files
  (shuffle_after_epoch, seeded from (seed, epoch), same on all ranks so the parts stay disjoint)
  and draws samples at random from a buffer of `initial_fill` samples read in that order. Packs
  store samples sorted by label, so a batch then mixes only the classes of the buffer's
  ~initial_fill / shard_size shards: that is why "global" is the train default.

Determinism: same seed -> same order and the same crops and flips. "global": boxes and flips
are keyed by (seed, epoch, pack index), the same as the torch backend's (pixels then differ by the
decoder and resize, like val), so a pass started at batch k (`set_epoch(e, start_batch=k)`)
yields the tail of the full pass, pixels included, and reads no byte of batches 0..k-1 (costs
~25 us of Python per sample in the feeding thread for the box). "reader": pipeline and reader
seeds derive from (seed, epoch, rank) and DALI's RNG advances batch by batch; it cannot start
mid-pass (FastKDError). On the GPU the hardware decoder may differ from nvJPEG's CUDA decoder in
the last bit. Cost of rebuilding per pass: about a second (thread start, reader index).
"""

from __future__ import annotations

import numpy as np
import torch

from fastkd.data.contract import Loader, LoaderSpec
from fastkd.data.spec import FLIP_PROB, IMAGENET_MEAN, IMAGENET_STD, TRAIN_RATIO, TRAIN_SCALE, VAL_CROP_RATIO
from fastkd.data.packed import ShardStore
from fastkd.data.sharding import derive_seed
from fastkd.data.transforms import train_boxes
from fastkd.errors import FastKDError

_LABEL_BYTES = 12  # .cls holds an ASCII decimal label; padded to this many bytes for a dense batch
_KEY_BYTES = 256  # source_info ("shard.tar:offset:00000042.jpg"), padded, for return_indices


def _labels_from_ascii(cls: torch.Tensor) -> torch.Tensor:
    """uint8 [B, L] ASCII digits, zero padded -> int64 [B]."""
    digits = cls.to(torch.int64) - 48
    valid = cls > 0
    n = valid.sum(1, keepdim=True)
    pos = torch.arange(cls.shape[1]).unsqueeze(0)
    power = torch.where(valid, n - 1 - pos, torch.zeros_like(pos)).clamp_(min=0)
    return (torch.where(valid, digits, torch.zeros_like(digits)) * (10 ** power)).sum(1)


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) of a JPEG from its frame header, without decoding (walks the marker
    segments up to the first SOFn; a few of them in a packed JPEG)."""
    n, pos = len(data), 2
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    while pos + 9 <= n:
        if data[pos] != 0xFF:
            raise ValueError(f"corrupt JPEG: no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # segments without a length
            pos += 2
            continue
        if marker in _SOF:
            return (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8]
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    raise ValueError("corrupt JPEG: no frame header (SOFn) found")


def _indices_from_keys(info: torch.Tensor) -> np.ndarray:
    out = []
    for row in info.numpy():
        name = bytes(row).rstrip(b"\0 ").decode().rsplit(":", 1)[-1]
        out.append(int(name.split("/")[-1].split(".")[0]))
    return np.asarray(out, dtype=np.int64)


class DALILoader(Loader):
    backend = "dali"

    def __init__(self, spec: LoaderSpec, manifest: dict, shards: list, shuffle: str | None = None,
                 initial_fill: int = 4096,
                 hw_decoder_load: float = 0.65, device_memory_padding: int = 211025920,
                 host_memory_padding: int = 140544512, prefetch_queue_depth: int = 2):
        super().__init__(spec, manifest)
        shuffle = shuffle or ("global" if spec.train else "reader")
        if shuffle not in ("global", "reader"):
            raise FastKDError(f"dali shuffle must be 'global' or 'reader', not {shuffle!r}")
        self.shuffle = shuffle
        if shuffle == "reader":
            self.supports_start_batch = False
            self.why_no_start_batch = ("with shuffle='reader' DALI's webdataset reader has no seek and its order "
                                       "comes from a buffer filled by reading; use shuffle='global'")
        self.store = ShardStore(shards, self.num_samples) if shuffle == "global" else None
        self.tars = [str(t) for t, _ in shards]
        self.idxs = [str(i) for _, i in shards]
        self.initial_fill = int(initial_fill)
        self.hw_decoder_load = float(hw_decoder_load)
        self.device_memory_padding = int(device_memory_padding)
        self.host_memory_padding = int(host_memory_padding)
        self.prefetch_queue_depth = int(prefetch_queue_depth)
        self._gpu = spec.device.type == "cuda"
        # per-rank sample count of DALI's contiguous split
        N, W, r = self.num_samples, spec.world_size, spec.rank
        self.part_size = (N * (r + 1)) // W - (N * r) // W

    def __len__(self) -> int:
        s = self.spec
        if self.shuffle == "global":
            return super().__len__()
        if s.drop_last:
            return (self.num_samples // s.world_size) // s.batch_size
        return -(-self.part_size // s.batch_size)

    def _pipeline(self, epoch: int, start: int = 0):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath

        s, r, train = self.spec, self.resolution, self.spec.train
        dec_device = "mixed" if self._gpu else "cpu"
        dec_opts = {}
        if self._gpu:
            dec_opts = dict(hw_decoder_load=self.hw_decoder_load,
                            device_memory_padding=self.device_memory_padding,
                            host_memory_padding=self.host_memory_padding)
        out_type = types.FLOAT16 if s.dtype == torch.float16 else types.FLOAT

        @pipeline_def
        def pipe():
            if self.shuffle == "global":
                if train:  # + each sample's box (x, y), (w, h) and flip, from (seed, epoch, index)
                    jpegs, indices, anchor, size, flip = fn.external_source(
                        source=self._external(epoch, start), num_outputs=5, batch=True,
                        dtype=[types.UINT8, types.INT64, types.INT32, types.INT32, types.INT32])
                else:
                    jpegs, indices = fn.external_source(source=self._external(epoch, start), num_outputs=2,
                                                        batch=True, dtype=[types.UINT8, types.INT64])
            else:
                shuffle = {}
                if train:  # tar order from (seed, epoch), same on all ranks; buffer draws per rank
                    shuffle = dict(random_shuffle=True, initial_fill=self.initial_fill, shuffle_after_epoch=True,
                                   shuffle_after_epoch_seed=derive_seed(s.seed, epoch),
                                   seed=derive_seed(s.seed, epoch, s.rank, 1))
                jpegs, cls = fn.readers.webdataset(
                    paths=self.tars, index_paths=self.idxs, ext=["jpg", "cls"], name="reader",
                    shard_id=s.rank, num_shards=s.world_size, pad_last_batch=True,
                    missing_component_behavior="error", **shuffle)
            if train and self.shuffle == "global":
                # adjust_orientation=False: the box is in the stored pixel grid (as torch decodes it)
                images = fn.decoders.image_slice(jpegs, device=dec_device, output_type=types.RGB, start=anchor,
                                                 shape=size, axis_names="WH", adjust_orientation=False,
                                                 **dec_opts)
                mirror = flip
            elif train:
                images = fn.decoders.image_random_crop(
                    jpegs, device=dec_device, output_type=types.RGB, random_area=list(TRAIN_SCALE),
                    random_aspect_ratio=list(TRAIN_RATIO), num_attempts=10, **dec_opts)
                mirror = fn.random.coin_flip(probability=FLIP_PROB)
            else:
                # the same integer box as transforms.center_crop_box: side = int(0.875 * min(H, W)),
                # top-left = ((H - side) // 2, (W - side) // 2); decoded as a region of interest
                shape = fn.peek_image_shape(jpegs, dtype=types.INT32)  # [H, W, C]
                height, width = shape[0], shape[1]
                side = fn.cast(dmath.floor(fn.cast(dmath.min(height, width), dtype=types.FLOAT) * VAL_CROP_RATIO),
                               dtype=types.INT32)
                corner = fn.stack((width - side) // 2, (height - side) // 2)
                images = fn.decoders.image_slice(jpegs, device=dec_device, output_type=types.RGB,
                                                 start=corner, shape=fn.stack(side, side), axis_names="WH",
                                                 **dec_opts)
                mirror = 0
            images = fn.resize(images, size=[r, r], interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.crop_mirror_normalize(
                images, dtype=out_type, output_layout="HWC", mirror=mirror,
                mean=[m * 255 for m in IMAGENET_MEAN], std=[v * 255 for v in IMAGENET_STD])
            if self.shuffle == "global":
                return images, indices
            labels = fn.pad(cls, axes=(0,), shape=(_LABEL_BYTES,), fill_value=0)
            outputs = [images, labels]
            if s.return_indices:
                info = fn.get_property(jpegs, key="source_info")
                outputs.append(fn.pad(info, axes=(0,), shape=(_KEY_BYTES,), fill_value=0))
            return tuple(outputs)

        device_id = (s.device.index or 0) if self._gpu else None  # None: CPU-only pipeline
        p = pipe(batch_size=s.batch_size, num_threads=s.num_workers, device_id=device_id,
                 seed=derive_seed(s.seed, epoch, s.rank, 2), prefetch_queue_depth=self.prefetch_queue_depth)
        try:
            p.build()
        except RuntimeError as error:
            raise FastKDError(f"DALI could not build its pipeline on {s.device} ({str(error).splitlines()[0]}); "
                              "the torch backend reads the same shards without DALI") from None
        return p

    def _external(self, epoch: int, start: int):
        """Batches start.. of the pass in sharding.py order, for fn.external_source: (JPEG bytes,
        pack index) and on train each sample's crop start (x, y), size (w, h) and flip."""
        s = self.spec
        for batch in self._pass_batches(epoch, start):
            data = [self.store.jpeg_bytes(i) for i in batch]
            out = ([np.frombuffer(d, np.uint8) for d in data], [np.array([i], np.int64) for i in batch])
            if not s.train:
                yield out
                continue
            hw = np.array([jpeg_size(d) for d in data], np.int64).reshape(-1, 2)  # [B, (H, W)]
            boxes, flips = train_boxes(s.seed, epoch, batch, hw[:, 0], hw[:, 1])  # the whole batch at once
            anchors = list(np.ascontiguousarray(boxes[:, [1, 0]], np.int32))  # (x, y) = (left, top) per sample
            sizes = list(np.ascontiguousarray(boxes[:, [3, 2]], np.int32))  # (w, h); DALI takes dense rows only
            yield out + (anchors, sizes, [np.array(f, np.int32) for f in flips])

    def _pass(self, epoch: int, start: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        s = self.spec
        pipe = self._pipeline(epoch, start)
        if self.shuffle == "global":
            it = DALIGenericIterator(pipe, ["images", "indices"], auto_reset=False,
                                     last_batch_policy=LastBatchPolicy.PARTIAL)
            try:
                for batch in it:
                    indices = batch[0]["indices"].reshape(-1).cpu().numpy()
                    images = batch[0]["images"].permute(0, 3, 1, 2)  # NHWC -> NCHW view = channels_last
                    images = images.to(s.device, non_blocking=True).to(s.dtype)
                    yield self._output(images, torch.from_numpy(self.store.labels[indices]), indices)
            finally:
                del it, pipe
            return
        names = ["images", "labels"] + (["info"] if s.return_indices else [])
        it = DALIGenericIterator(pipe, names, reader_name="reader", auto_reset=False,
                                 last_batch_policy=LastBatchPolicy.PARTIAL)
        steps = len(self)
        try:
            for step, batch in enumerate(it):
                if step >= steps:  # drop_last: equal step count on all ranks
                    break
                data = batch[0]
                labels = _labels_from_ascii(data["labels"].cpu())
                if s.drop_last and len(labels) < s.batch_size:
                    break
                images = data["images"].permute(0, 3, 1, 2)  # NHWC -> NCHW view = channels_last
                if images.device != s.device:
                    images = images.to(s.device, non_blocking=True)
                images = images.to(s.dtype)
                indices = _indices_from_keys(data["info"].cpu()) if s.return_indices else None
                yield self._output(images, labels, indices)
        finally:
            del it, pipe


def available() -> str | None:
    try:
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None

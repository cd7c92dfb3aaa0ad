"""`nvimgcodec` backend: the DALI shards decoded by NVIDIA nvImageCodec, one region per image.

Each batch: the JPEG bytes (read through the shards' index files, like the torch backend) are
staged into a pinned host buffer; each image's crop box comes from the JPEG header's size and
transforms.py (train: `train_params(seed, epoch, index, H, W)`, the torch backend's boxes and
flips; val: `center_crop_box`; or a teacher cache's `crop_fn`); one batched
`Decoder.decode` call decodes only those boxes (region-of-interest decode: a sub code stream
with a `Region`), RGB uint8 (planar on CUDA; interleaved on CPU, the channels_last layout the
CPU resize kernel reads without a copy); then the batch is resized to r x r (antialiased
bilinear, `transforms.crop_resize_batch` on the whole box, or per image on CPU), flipped and
normalised on the loader's device.

Decoders (`decoders=`):
  "hw"   (default) the GPU's hardware JPEG engines (A100, H100, H200: nvjpeg's hardware
         backend, HW_GPU_ONLY) take `hw_decoder_load` of each batch; the rest, and any image
         the engines refuse (progressive, unusual subsampling), goes to nvImageCodec's CUDA
         decoder, then to its CPU decoder. Without the engines `build_loader` falls back (below).
  Per image: any image a decoder returns None for is decoded again by the next one (hw: CUDA
  alone, then CPU; gpu: CPU) and, last, by torchvision (libjpeg-turbo, whole image, then the
  box); only an image that all of them refuse is an error. The rest of its batch is kept.
  "gpu"  the CUDA decoder (then CPU): nvJPEG on the SMs, like the torch backend, but ROI.
  "cpu"  libjpeg-turbo inside nvImageCodec on `num_workers` host threads (ROI: the IDCT of
         blocks outside the box is skipped); on a CUDA device the decoded boxes travel in one
         pinned copy and are resized there.

Overlap: one producer thread per pass decodes and augments up to `batches_ahead` (default 2)
batches ahead of the step. On CUDA it works on its own stream S, and the order is:
  1. decode: every GPU decoder gets `cuda_stream=S` (nvImageCodec makes its results ready in
     S's order; host decoders run to completion before `decode` returns and travel by one
     pinned copy queued on S);
  2. the decoded images become torch views through DLPack with S current (torch passes S to
     `__dlpack__`, nvImageCodec makes S wait for the decode), and resize, flip, normalise and
     the label copy are queued on S;
  3. an event E is recorded on S; the consumer's stream waits on E (`wait_event`, no host block)
     and `record_stream`s the batch, so the caching allocator keeps its memory until then.
  nvJPEG's hardware batched path may write before earlier work on its stream is done (seen by
  torchcodec on H100): harmless here, as each decode writes fresh nvImageCodec images, and an
  image (and its JPEG bytes) is freed only after its batch's E completed, across passes too. Staging buffers (JPEG bytes, labels, host-decoded
pixels) are pinned and kept per slot in a ring of batches_ahead + 2 slots; a slot is refilled
only after its previous batch's event has completed (a wait in the producer thread, never in
the step). The decoded images of a slot stay referenced until then too.

Fallback (in `build_loader`, via `why_not`): without the package, without the engines for
decoders="hw" (or without CUDA for "hw"/"gpu"), the torch backend runs instead (same boxes and
flips, decoded by nvJPEG on CUDA or libjpeg-turbo on CPU) and one line says why.

Pixels: on CPU nvImageCodec's libjpeg-turbo gives the same pixels as torchvision's decode_jpeg
(tests/test_nvimgcodec.py checks equality), and the resize of a decoded box equals the torch
backend's crop + resize of the same box, so both backends give identical batches. GPU decoders
(CUDA, hardware) differ from libjpeg-turbo by a few levels, as nvJPEG does in the torch backend.
Order, sharding, `set_epoch(e, start_batch=k)` (nothing before batch k is read): contract.py.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from fastkd import nvjpeg_library
from fastkd.data.contract import Loader, LoaderSpec
from fastkd.data.packed import ShardStore
from fastkd.data.prefetch import prefetched
from fastkd.data.transforms import crop_params, crop_resize, crop_resize_batch
from fastkd.errors import FastKDError

DECODERS = ("hw", "gpu", "cpu")
_hw_probe: dict[int, str | None] = {}  # CUDA index -> why the engines cannot decode (None: they can)


def available() -> str | None:
    """None if nvImageCodec imports, else why not."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except Exception as error:  # ImportError, or a missing shared library (OSError)
        return f"{type(error).__name__}: {error}"
    return None


def _probe_jpeg() -> bytes:
    """A 64 x 48 baseline 4:2:0 JPEG (libjpeg's defaults): what the engines must decode."""
    from torchvision.io import encode_jpeg

    y, x = torch.meshgrid(torch.arange(48), torch.arange(64), indexing="ij")
    image = torch.stack([x * 4, y * 5, (x + y) * 2]).to(torch.uint8)
    return bytes(encode_jpeg(image, quality=90).numpy())


def _probe_stream(index: int):
    """A side stream on cuda:`index`, as each loader pass decodes on one."""
    return torch.cuda.Stream(device=index)


def hardware_missing(index: int) -> str | None:
    """None when CUDA device `index` decodes a region of a baseline 4:2:0 JPEG on its hardware
    JPEG engines through nvImageCodec exactly as the loader will (same Decoder options, region
    decode, planar RGB, on a side stream; a decoder with HW_GPU_ONLY alone, so no other decoder
    can stand in for missing engines), else why not. Probed once per device per process."""
    if index in _hw_probe:
        return _hw_probe[index]
    why = available()
    if why is None:
        try:
            from nvidia import nvimgcodec as nv

            decoder = _make_decoder(nv, index, [nv.Backend(nv.BackendKind.HW_GPU_ONLY, load_hint=1.0)], 1)
            sub = nv.CodeStream(_probe_jpeg()).get_sub_code_stream(region=nv.Region(8, 16, 40, 48))
            stream = _probe_stream(index)
            image = _decode_on(decoder, [sub], _decode_params(nv), stream.cuda_stream)[0]
            if image is None:
                why = f"{torch.cuda.get_device_name(index)} has no hardware JPEG decoder that nvImageCodec can use"
            elif tuple(_device_tensor(image, torch.device("cuda", index)).shape) != (3, 32, 32):
                why = f"nvImageCodec's hardware decoder gave a {tuple(image.shape)} region, not [3, 32, 32]"
        except Exception as error:
            why = f"nvImageCodec's hardware decoder failed on cuda:{index} ({type(error).__name__}: {error})"
    _hw_probe[index] = why
    return why


def why_not(device: torch.device, decoders: str = "hw") -> str | None:
    """Why the nvimgcodec backend cannot run with `decoders` on `device` (None: it can)."""
    if decoders not in DECODERS:
        raise FastKDError(f"nvimgcodec decoders must be one of {', '.join(DECODERS)}, not {decoders!r}")
    why = available()
    if why is not None:
        return f"nvImageCodec is not importable ({why})"
    if decoders == "cpu":
        return None
    if device.type != "cuda":
        return f"decoders={decoders!r} needs a CUDA device (the loader's device is {device})"
    if decoders == "hw":
        return hardware_missing(device.index if device.index is not None else torch.cuda.current_device())
    return None


def _decode_params(nv, interleaved: bool = False):
    """The stored pixel grid (as torchvision's decode_jpeg gives it), RGB uint8: planar [3, h, w],
    or interleaved [h, w, 3] (viewed as [3, h, w] channels_last, which the CPU resize kernel reads
    without the copy it makes of a planar crop)."""
    fmt = nv.SampleFormat.I_RGB if interleaved else nv.SampleFormat.P_RGB
    return nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB, sample_format=fmt)


def _make_decoder(nv, device_id: int, backends: list, threads: int):
    """One nvImageCodec Decoder; the options make ROI decodes of 4:2:0 JPEGs work on an nvJPEG
    older than 13.2 (one mapped before fastkd's, see fastkd.nvjpeg_library)."""
    return nv.Decoder(device_id=device_id, max_num_cpu_threads=threads, backends=backends,
                      options=nvjpeg_library.decoder_options())


def _decoder_stages(nv, device: torch.device, decoders: str, threads: int, hw_load: float) -> list:
    """Decoder makers in fallback order: an image the first returns None for goes to the
    next. hw: engines for hw_load of the batch (+ CUDA, CPU), then CUDA alone, then CPU; gpu:
    CUDA (+ CPU), then CPU; cpu: CPU. torchvision is the last resort after these (_Chain)."""
    cpu = lambda: _make_decoder(nv, nv.NVIMGCODEC_DEVICE_CPU_ONLY, [nv.Backend(nv.BackendKind.CPU_ONLY)], threads)
    if decoders == "cpu":
        return [cpu]
    index = device.index if device.index is not None else torch.cuda.current_device()
    both = [nv.Backend(nv.BackendKind.GPU_ONLY), nv.Backend(nv.BackendKind.CPU_ONLY)]
    gpu = lambda: _make_decoder(nv, index, both, threads)
    if decoders == "gpu":
        return [gpu, cpu]
    hw_first = [nv.Backend(nv.BackendKind.HW_GPU_ONLY, load_hint=hw_load), *both]
    hw = lambda: _make_decoder(nv, index, hw_first, threads)
    cuda = lambda: _make_decoder(nv, index, [nv.Backend(nv.BackendKind.GPU_ONLY)], threads)
    return [hw, cuda, cpu]


def _decode_on(decoder, subs: list, params, cuda_stream: int) -> list:
    """decoder.decode of a batch of sub code streams, ordered on `cuda_stream` (0: host decoders)."""
    return decoder.decode(subs, params=params, cuda_stream=cuda_stream)


def decode_with_fallback(stages: list, count: int) -> list:
    """`count` images from `stages`, callables positions -> [image or None]: each stage gets
    only the positions every earlier stage returned None for. None where all failed."""
    images: list = [None] * count
    todo = list(range(count))
    for stage in stages:
        if not todo:
            break
        for k, image in zip(todo, stage(todo)):
            images[k] = image
        todo = [k for k in todo if images[k] is None]
    return images


def _torchvision_region(view: np.ndarray, box, interleaved: bool) -> torch.Tensor | None:
    """The last resort: libjpeg-turbo through torchvision, whole image then the box; host uint8
    in the decoders' layout ([h, w, 3] interleaved or [3, h, w] planar). None if it fails too."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        image = decode_jpeg(torch.from_numpy(view), mode=ImageReadMode.RGB)  # [3, H, W]
    except RuntimeError:
        return None
    t, l, h, w = box
    region = image[:, t:t + h, l:l + w]
    return region.permute(1, 2, 0) if interleaved else region


def _on_host(image) -> bool:
    """A decoded image in host memory (a CPU decoder's or torchvision's)."""
    return isinstance(image, torch.Tensor) or getattr(image, "cuda_stream", None) is None


def _device_tensor(image, device: torch.device) -> torch.Tensor:
    """A decoded device image as a torch view (no copy), valid on the current stream: DLPack
    makes that stream wait for the decode; the CUDA array interface (the fallback where DLPack
    fails) needs no wait because the decode was already ordered on that same stream."""
    try:
        return torch.from_dlpack(image)
    except (TypeError, BufferError, RuntimeError, AttributeError):
        return torch.as_tensor(image, device=device)


class _Slot:
    """One batch's staging: pinned JPEG bytes, labels and (host decode on CUDA) pixels, plus the
    event after which the slot's previous batch no longer needs them."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.buffers: dict[str, torch.Tensor] = {}
        self.event: torch.cuda.Event | None = None
        self.keep: Any = None  # the decoded images and code streams of the slot's last batch

    def buffer(self, name: str, count: int, dtype=torch.uint8) -> torch.Tensor:
        """A [count] view of this slot's `name` buffer (grown by 1/4 over the need)."""
        have = self.buffers.get(name)
        if have is None or have.numel() < count or have.dtype != dtype:
            have = torch.empty(max(1, count + count // 4), dtype=dtype, pin_memory=self.pinned)
            self.buffers[name] = have
        return have[:count]

    def reuse(self) -> None:
        """Wait (producer thread) until the GPU is done with this slot's previous batch."""
        if self.event is not None:
            self.event.synchronize()
        self.event, self.keep = None, None


class NvImgCodecLoader(Loader):
    backend = "nvimgcodec"
    supports_crop_fn = True

    def __init__(self, spec: LoaderSpec, manifest: dict, shards: list, decoders: str = "hw",
                 hw_decoder_load: float = 0.9, batches_ahead: int = 2, batched_resize: bool | None = None,
                 crop_fn=None):
        super().__init__(spec, manifest)
        why = why_not(spec.device, decoders)
        if why is not None:  # build_loader falls back before this; a direct construction fails
            raise FastKDError(f"the nvimgcodec loader cannot run here: {why}")
        from nvidia import nvimgcodec

        self.nv = nvimgcodec
        self.store = ShardStore(shards, self.num_samples)
        self.decoders = decoders
        self.hw_decoder_load = min(1.0, max(0.0, float(hw_decoder_load)))
        self.batches_ahead = max(1, int(batches_ahead))
        self._gpu = spec.device.type == "cuda"
        self.batched_resize = self._gpu if batched_resize is None else bool(batched_resize)
        self._params = _decode_params(nvimgcodec, interleaved=not self._gpu)
        self._decoders: list = []  # [(decoder or None until first needed, maker)], kept across passes
        self._retired: list[_Slot] = []
        self._lock = threading.Lock()  # one decode at a time (a pass left early may still be decoding)
        self.crop_fn = None
        if crop_fn is not None:
            self.set_crop_fn(crop_fn)

    def _use_crop_fn(self, crop_fn) -> None:
        self.crop_fn = crop_fn

    def _boxes(self, shapes, indices, epoch: int) -> list:
        """[((top, left, h, w), flip)] per image: the torch backend's crops (transforms.crop_params,
        drawn for the whole batch at once)."""
        s = self.spec
        boxes, flips = crop_params(shapes, indices, s.seed, epoch, s.train, self.crop_fn)
        return list(zip(map(tuple, boxes.tolist()), flips.tolist()))

    def _decode(self, slot: _Slot, indices: np.ndarray, epoch: int, stream) -> tuple[list, list]:
        """Stage the JPEGs, decode each one's box: (decoded images, [(box, flip)])."""
        nv = self.nv
        chunks = [self.store.jpeg_bytes(i) for i in indices]
        sizes = [len(c) for c in chunks]
        staged = slot.buffer("jpeg", sum(sizes)).numpy()
        views, pos = [], 0
        for chunk, size in zip(chunks, sizes):
            staged[pos:pos + size] = np.frombuffer(chunk, np.uint8)
            views.append(staged[pos:pos + size])
            pos += size
        codes, shapes = [], []
        for i, view in zip(indices, views):
            try:  # the header is parsed here: a broken JPEG fails now, before any decode
                codes.append(nv.CodeStream(view))
                shapes.append((codes[-1].height, codes[-1].width))
            except RuntimeError as error:
                self._undecodable([i], str(error))
        params = self._boxes(shapes, indices, epoch)
        subs = [c.get_sub_code_stream(region=nv.Region(t, l, t + h, l + w))
                for c, ((t, l, h, w), _) in zip(codes, params)]
        on_stream = stream.cuda_stream if stream is not None else 0
        with self._lock:
            images = decode_with_fallback(self._stages(subs, views, params, on_stream), len(subs))
        failed = [i for i, im in zip(indices, images) if im is None]
        if failed:
            self._undecodable(failed, f"neither the {self.decoders!r} decoders nor torchvision could decode it")
        slot.keep = (images, subs, codes)
        return images, params

    def _stages(self, subs: list, views: list, params: list, cuda_stream: int) -> list:
        """The fallback stages for one batch: nvImageCodec decoders (GPU ones ordered on
        `cuda_stream`, host ones on 0), made when first needed, then torchvision."""
        if not self._decoders:
            made = _decoder_stages(self.nv, self.spec.device, self.decoders, self.spec.num_workers,
                                   self.hw_decoder_load)
            self._decoders = [[None, make] for make in made]

        def nvimgcodec_stage(entry, on_device: bool):
            def run(todo):
                if entry[0] is None:
                    entry[0] = entry[1]()
                return _decode_on(entry[0], [subs[k] for k in todo], self._params, cuda_stream if on_device else 0)
            return run

        last = len(self._decoders) - 1  # the CPU decoder: always last, host memory
        stages = [nvimgcodec_stage(e, self._gpu and k < last) for k, e in enumerate(self._decoders)]
        stages.append(lambda todo: [_torchvision_region(views[k], params[k][0], not self._gpu) for k in todo])
        return stages

    def _undecodable(self, indices, why: str):
        i = int(indices[0])
        more = f" (and {len(indices) - 1} more in its batch)" if len(indices) > 1 else ""
        raise FastKDError(f"{self.store.tars[self.store.shard[i]]}: sample {i} of split {self.spec.split!r}{more} "
                          f"is not a JPEG nvImageCodec can decode ({why}); re-run `fastkd pack`")

    def _tensors(self, slot: _Slot, images: list) -> list[torch.Tensor]:
        """Decoded images -> uint8 [3, h, w] tensors on the loader's device (views, no copy, where
        they already are there; host-decoded boxes on CUDA: one pinned buffer, one copy)."""
        if not self._gpu:
            return [torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in images]  # [h,w,3] -> [3,h,w]
        tensors = [None if _on_host(im) else _device_tensor(im, self.spec.device) for im in images]
        host = [(k, np.asarray(im)) for k, im in enumerate(images) if tensors[k] is None]  # planar [3,h,w]
        if not host:
            return tensors
        counts = [a.size for _, a in host]
        pinned = slot.buffer("pixels", sum(counts))
        flat = pinned.numpy()
        pos = 0
        for (_, a), n in zip(host, counts):
            flat[pos:pos + n].reshape(a.shape)[...] = a
            pos += n
        device = pinned.to(self.spec.device, non_blocking=True)
        for (k, a), t in zip(host, torch.split(device, counts)):
            tensors[k] = t.view(a.shape)
        return tensors

    def _batch(self, slot: _Slot, indices: np.ndarray, epoch: int, resolution: int, stream):
        """One batch, all queued (on `stream` on CUDA): (normalised images, labels, indices)."""
        images, params = self._decode(slot, indices, epoch, stream)
        tensors = self._tensors(slot, images)
        boxes = [(0, 0, t.shape[1], t.shape[2]) for t in tensors]  # each image is already its box
        flips = [f for _, f in params]
        if self.batched_resize:
            batch = crop_resize_batch(tensors, boxes, flips, resolution)
        else:
            batch = torch.cat([crop_resize(t, b, resolution, f) for t, b, f in zip(tensors, boxes, flips)])
        labels = torch.from_numpy(self.store.labels[indices])  # a copy (fancy indexing)
        if self._gpu:  # through the slot's pinned buffer: an asynchronous copy on the stream
            labels = slot.buffer("labels", len(indices), torch.int64).copy_(labels)
            labels = labels.to(self.spec.device, non_blocking=True)
        return self.normalize(batch), labels, indices

    def _pass(self, epoch: int, start: int):
        batches = self._pass_batches(epoch, start)  # batches before `start` are never read
        s, resolution = self.spec, self.resolution
        stream = torch.cuda.Stream(s.device) if self._gpu else None
        slots = [_Slot(pinned=self._gpu) for _ in range(self.batches_ahead + 2)]
        retired, self._retired = self._retired, slots  # the last pass's slots: freed once their GPU work is done

        def make():  # runs in the prefetch thread only
            for old in retired:
                old.reuse()  # waits (in this thread) for the events of a pass left early
            for k, indices in enumerate(batches):
                slot = slots[k % len(slots)]
                slot.reuse()  # waits (in this thread) until the slot's previous batch was consumed
                if stream is None:
                    yield (*self._batch(slot, indices, epoch, resolution, None), None)
                    continue
                with torch.cuda.device(s.device), torch.cuda.stream(stream):
                    images, labels, idx = self._batch(slot, indices, epoch, resolution, stream)
                    slot.event = torch.cuda.Event()
                    slot.event.record(stream)
                yield images, labels, idx, slot.event

        for images, labels, indices in prefetched(make(), depth=self.batches_ahead, name="fastkd-nvimgcodec"):
            yield self._output(images, labels, indices)

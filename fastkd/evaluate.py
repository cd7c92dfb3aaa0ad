"""Validation metrics for one or more networks on one pass over a loader.

    from fastkd.evaluate import evaluate
    res = evaluate({"resnet18": m1, "mobilenet_v2": m2}, val_loader, teacher=t)
    res["resnet18"]["top1"]          # percent, 0..100
    res["teacher"]["top1"]           # only with `teacher=`
    res["teacher_w"]["mean"]         # mean teacher confidence weight w(x), only with a teacher

Per network: top-1 and top-k accuracy (k = min(5, C), in percent), mean cross-entropy, expected
calibration error (ECE, equal-width confidence bins, as a fraction) and the reliability-diagram
data. For the teacher also the mean and histogram of its confidence weight

    w(x) = 1 - H(softmax(t / T_w)) / log C        in [0, 1]

the weight the uncertainty-aware loss puts on its distillation term (see `fastkd.losses`).

Everything is accumulated as sums and counts on the loader's device (no host sync inside the
loop) and, when `torch.distributed` is initialised, all-reduced across ranks as sums before the
one transfer to the host, so every rank returns the metrics of the whole (sharded) val set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastkd.losses import confidence_weight  # w(x), the same function the loss weights by

TEACHER = "teacher"
TEACHER_W = "teacher_w"

# Layout of one network's accumulator vector (float64, one all_reduce for everything):
# [n, correct1, correctk, ce_sum] + bin_count[B] + bin_conf_sum[B] + bin_correct_sum[B]
_N, _C1, _CK, _CE, _HEAD = 0, 1, 2, 3, 4


def _bin_index_right(values: Tensor, num_bins: int) -> Tensor:
    """Equal-width bins (lo, hi] over [0, 1]: bin b holds b/B < v <= (b+1)/B (v = 0 goes to bin 0)."""
    return (torch.ceil(values * num_bins).long() - 1).clamp_(0, num_bins - 1)


def _bin_index_left(values: Tensor, num_bins: int) -> Tensor:
    """Equal-width bins [lo, hi) over [0, 1], the last one closed (numpy.histogram's convention)."""
    return torch.floor(values * num_bins).long().clamp_(0, num_bins - 1)


class _NetAccumulator:
    """Sums for one network, kept on the device as one float64 vector."""

    def __init__(self, num_bins: int, device: torch.device):
        self.num_bins = num_bins
        self.sums = torch.zeros(_HEAD + 3 * num_bins, dtype=torch.float64, device=device)
        self.k = None

    def add(self, logits: Tensor, labels: Tensor) -> None:
        logits = logits.float()  # [B, C]
        num_classes = logits.shape[-1]
        k = min(5, num_classes)
        self.k = k
        B = self.num_bins
        topk = logits.topk(k, dim=-1).indices  # [B, k]
        hits = topk == labels[:, None]  # [B, k]
        correct1 = hits[:, 0]
        probs = logits.softmax(dim=-1)
        confidence, _ = probs.max(dim=-1)  # [B]
        bins = _bin_index_right(confidence, B)
        s = self.sums
        s[_N] += labels.numel()
        s[_C1] += correct1.sum()
        s[_CK] += hits.any(dim=-1).sum()
        s[_CE] += F.cross_entropy(logits, labels, reduction="sum").double()
        s[_HEAD : _HEAD + B] += torch.bincount(bins, minlength=B).double()
        s[_HEAD + B : _HEAD + 2 * B].index_add_(0, bins, confidence.double())
        s[_HEAD + 2 * B :].index_add_(0, bins, correct1.double())

    def result(self, sums: list[float]) -> dict:
        B = self.num_bins
        n = sums[_N]
        count = sums[_HEAD : _HEAD + B]
        conf_sum = sums[_HEAD + B : _HEAD + 2 * B]
        correct_sum = sums[_HEAD + 2 * B :]
        confidence = [c / m if m else 0.0 for c, m in zip(conf_sum, count)]
        accuracy = [c / m if m else 0.0 for c, m in zip(correct_sum, count)]
        # ECE = sum_b (n_b / n) * |acc_b - conf_b|
        ece = sum(abs(a - c) * m for a, c, m in zip(accuracy, confidence, count)) / n if n else 0.0
        return {
            "top1": 100.0 * sums[_C1] / n if n else 0.0,
            "top5": 100.0 * sums[_CK] / n if n else 0.0,
            "topk": self.k,
            "loss": sums[_CE] / n if n else 0.0,
            "ece": ece,
            "n": int(n),
            "reliability": {
                "confidence": confidence,  # mean confidence per bin (0.0 where empty)
                "accuracy": accuracy,  # fraction correct per bin (0.0 where empty)
                "count": [int(c) for c in count],
                "edges": [b / B for b in range(B + 1)],
            },
        }


def _autocast(images: Tensor):
    """Autocast in the loader's dtype when it is a half type; fp32 images run as they are."""
    if images.dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type=images.device.type, dtype=images.dtype)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _eval_mode(modules: Iterable[nn.Module]):
    modules = list(modules)
    was_training = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


def evaluate(
    models: Mapping[str, nn.Module],
    loader: Iterable,
    teacher: nn.Module | None = None,
    w_temperature: float = 1.0,
    num_bins: int = 15,
) -> dict:
    """One pass over `loader`; metrics per network (and the teacher), reduced across ranks.

    models: name -> network; `teacher`, when given, is evaluated once per batch under the name
    "teacher" and its w(x) = 1 - H(softmax(t / w_temperature)) / log C summarised in
    res["teacher_w"] = {"mean", "hist", "edges"} (num_bins equal-width bins over [0, 1]).

    Returns res[name] = {"top1", "top5" (percent), "topk" (the k of "top5", min(5, C)),
    "loss" (mean CE), "ece" (fraction), "n" (samples), "reliability": {"confidence",
    "accuracy", "count", "edges"}} for every name in models, plus "teacher" and "teacher_w"
    with a teacher. Modules are put in eval mode for the pass and restored afterwards.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if teacher is not None and (TEACHER in models or TEACHER_W in models):
        raise ValueError(f"network names {TEACHER!r} and {TEACHER_W!r} are reserved for the teacher")
    nets = dict(models)
    if teacher is not None:
        nets[TEACHER] = teacher

    acc: dict[str, _NetAccumulator] = {}
    w_sums = None  # [n, w_sum] + hist[B], float64 on the device
    with _eval_mode(nets.values()), torch.inference_mode():
        for images, labels in loader:
            if not acc:
                acc = {name: _NetAccumulator(num_bins, labels.device) for name in nets}
                if teacher is not None:
                    w_sums = torch.zeros(2 + num_bins, dtype=torch.float64, device=labels.device)
            with _autocast(images):
                logits = {name: net(images) for name, net in nets.items()}
            for name, out in logits.items():
                acc[name].add(out, labels)
            if teacher is not None:
                w = confidence_weight(logits[TEACHER], w_temperature)
                w_sums[0] += w.numel()
                w_sums[1] += w.sum().double()
                w_sums[2:] += torch.bincount(_bin_index_left(w, num_bins), minlength=num_bins).double()

    if not acc:  # empty loader: this rank saw nothing, but must still join the all_reduce
        device = _module_device(nets)
        acc = {name: _NetAccumulator(num_bins, device) for name in nets}
        if teacher is not None:
            w_sums = torch.zeros(2 + num_bins, dtype=torch.float64, device=device)

    names = list(acc)
    parts = [acc[name].sums for name in names] + ([w_sums] if w_sums is not None else [])
    flat = torch.cat(parts)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # sums and counts, never means
    values = flat.cpu().tolist()  # the one host sync

    res: dict = {}
    width = _HEAD + 3 * num_bins
    for i, name in enumerate(names):
        res[name] = acc[name].result(values[i * width : (i + 1) * width])
    if w_sums is not None:
        w_vals = values[len(names) * width :]
        n = w_vals[0]
        res[TEACHER_W] = {
            "mean": w_vals[1] / n if n else 0.0,
            "hist": [int(c) for c in w_vals[2:]],
            "edges": [b / num_bins for b in range(num_bins + 1)],
            "temperature": w_temperature,
        }
    return res


def _module_device(nets: Mapping[str, nn.Module]) -> torch.device:
    for net in nets.values():
        for p in net.parameters():
            return p.device
    return torch.device("cpu")

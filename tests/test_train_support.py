"""Helpers for the trainer tests (no tests here): a tiny in-memory loader honouring the loader
contract, and small config builders. Imported by tests/test_train*.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pytest

from fastkd.config import resolve_config


@pytest.fixture(autouse=False)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SyntheticLoader:
    """`build_loader`'s contract on an in-memory, learnable data set: class c is a colour
    prototype plus noise. Shuffled per (seed, epoch) for train, sharded by rank, drop_last."""

    def __init__(self, n=256, num_classes=4, batch_size=32, resolution=16, train=True, seed=0,
                 rank=0, world_size=1, base_res=16):
        protos = torch.randn(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(1234)) * 1.5
        g = torch.Generator().manual_seed(99 + (0 if train else 1))  # same classes, other samples
        self.labels = torch.arange(n) % num_classes
        self.images = protos[self.labels] + 0.8 * torch.randn(n, 3, base_res, base_res, generator=g)
        self.num_classes = num_classes
        self.manifest = {"classes": [{"label": i, "wnid": f"synth{i}", "name": f"c{i}", "imagenet_index": None}
                                     for i in range(num_classes)]}
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.resolution, self.epoch, self.start_batch = resolution, 0, 0
        self.supports_start_batch = True
        self.resolutions = []  # set_resolution calls, for tests
        self.made = 0  # batches built (a pass started at batch k builds none before it)
        self.hook = None  # callable(batch_index) run before each batch is yielded

    def _indices(self):
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
            order = order[: n // self.world_size * self.world_size]
        else:
            order = torch.arange(n)
        return order[self.rank :: self.world_size]

    def __len__(self):
        k = len(self._indices())
        return k // self.batch_size if self.train else -(-k // self.batch_size)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def set_resolution(self, resolution):
        self.resolution = resolution
        self.resolutions.append(resolution)

    def __iter__(self):
        idx = self._indices()
        start, self.start_batch = self.start_batch, 0
        for b in range(start, len(self)):
            self.made += 1
            if self.hook is not None:
                self.hook(b)
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.images[sel]
            if images.shape[-1] != self.resolution:
                images = F.interpolate(images, size=self.resolution, mode="bilinear", align_corners=False)
            yield images.contiguous(memory_format=torch.channels_last), self.labels[sel].clone()
        self.epoch += 1


def loaders(**kwargs):
    train = SyntheticLoader(train=True, **kwargs)
    val_kwargs = dict(kwargs, n=128)
    return train, SyntheticLoader(train=False, **val_kwargs)


def tiny_config(out, **overrides):
    """A CPU config with tiny, fast settings; overrides are {"section.key": value}."""
    base = {
        "data.dir": "synthetic", "data.backend": "torch", "data.batch_size": 32, "data.resolution": 16,
        "data.val_resolution": 16, "model.students": ["resnet18", "mobilenet_v2"], "loss.method": "ce",
        "optim.lr_per_256": 0.4, "optim.weight_decay": 5e-5, "schedule.epochs": 2, "schedule.warmup_epochs": 0.5,
        "precision.amp": "fp32", "run.out": str(out), "run.device": "cpu", "run.log_every": 3,
        "run.live": False, "loss.label_smoothing": 0.0,
    }
    base.update(overrides)
    return resolve_config(None, {k: v if isinstance(v, str) else _yaml(v) for k, v in base.items()})


def _yaml(value):
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def ensure_losses():
    """Until fastkd.losses lands: a stand-in with its API (CE + teacher KD + peer KL)."""
    import sys
    import types
    from dataclasses import dataclass

    try:
        import fastkd.losses  # noqa: F401

        return
    except ImportError:
        pass

    @dataclass
    class LossConfig:
        method: str = "uadkd"
        temperature: float = 4.0
        entropy_temperature: float = 1.0
        a_ce: float = 1.0
        a_kd: float = 1.0
        a_peer: float = 1.0
        label_smoothing: float = 0.0

        @classmethod
        def from_method(cls, method, **kw):
            return cls(method=method, **kw)

    def distillation_loss(t, students, labels, cfg, fused=True):
        T = cfg.temperature
        ce = torch.stack([F.cross_entropy(s, labels, label_smoothing=cfg.label_smoothing) for s in students])
        kd = torch.zeros(len(students))
        peer = torch.zeros(len(students))
        w = torch.ones(labels.shape[0])
        total = cfg.a_ce * ce.sum()
        if t is not None:
            pt = F.softmax(t / T, dim=1)
            kd = torch.stack([F.kl_div(F.log_softmax(s / T, 1), pt, reduction="batchmean") * T * T for s in students])
            total = total + cfg.a_kd * kd.sum()
        if cfg.method in ("dml", "dual", "uadkd") and len(students) == 2:
            a, b = students
            peer = torch.stack([
                F.kl_div(F.log_softmax(a / T, 1), F.softmax(b.detach() / T, 1), reduction="batchmean") * T * T,
                F.kl_div(F.log_softmax(b / T, 1), F.softmax(a.detach() / T, 1), reduction="batchmean") * T * T,
            ])
            total = total + cfg.a_peer * peer.sum()
        return {"loss": total, "ce": ce.detach(), "kd": kd.detach(), "peer": peer.detach(), "w": w}

    module = types.ModuleType("fastkd.losses")
    module.LossConfig, module.distillation_loss = LossConfig, distillation_loss
    sys.modules["fastkd.losses"] = module

"""The trainer: one frozen teacher and one or two students in one channels-last AMP step.

    trainer = Trainer(cfg)            # cfg: fastkd.config.TrainConfig
    summary = trainer.fit()           # epochs, evals, checkpoints, metrics.jsonl, report
    parts = trainer.step(images, labels)   # one optimizer step; dict of device tensors

The step: teacher in eval mode under inference_mode (its logits cloned out of inference mode for
the loss), students in train mode (in DDP when there are several ranks), the loss of
`fastkd.losses` (fused op by default), one SGD over both students. Nothing in the step reads a
value back to the host: loss parts, accuracies and w add up in a device vector (`StepMeter`)
that is all-reduced and read every `run.log_every` steps, where non-finite losses are caught.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fastkd import distributed
from fastkd.checkpoint import build_last, plain_state_dict, rng_state, save_atomic, set_rng_state
from fastkd.config import PEER_METHODS, TEACHER_METHODS, TrainConfig, check_runnable, config_to_dict, save_config
from fastkd.errors import FastKDError
from fastkd.models import build_model, count_params, load_teacher, network_names
from fastkd.schedule import lr_at, resolution_at, scaled_lr

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class NonFiniteLoss(FastKDError):
    """The training loss became NaN/inf: the run stops, the last good checkpoint is kept."""


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: a checkpoint was saved; `path` says where (None on ranks > 0)."""

    def __init__(self, path: Path | None):
        super().__init__(f"interrupted; checkpoint {path}")
        self.path = path


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FastKDError(f"run.device {name}: CUDA is not available here; use --run.device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return AMP_DTYPES[amp]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; BN parameters and biases (ndim <= 1) get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Students(nn.Module):
    """The students as one module (one DDP wrapper, one optimizer); forward -> [logits, ...]."""

    def __init__(self, nets: list[nn.Module], compile_mode: str = "none"):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.set_compile(compile_mode)

    def set_compile(self, mode: str) -> None:
        # compiled wrappers kept outside the module tree: state_dict keys stay torchvision's
        object.__setattr__(self, "_forwards", [compile_module(n, mode) for n in self.nets])

    def forward(self, images: Tensor) -> list[Tensor]:
        return [f(images) for f in self._forwards]


def compile_module(module: nn.Module, mode: str):
    if mode == "none":
        return module
    if mode == "inductor":
        return torch.compile(module)
    if mode == "cudagraphs":  # Triton-free: CUDA graphs of the captured FX graph
        return torch.compile(module, backend="cudagraphs")
    raise FastKDError(f"compile.mode {mode!r}: use none, inductor or cudagraphs")


class StepMeter:
    """Device-side sums over the steps since the last read: [samples, loss, w, ce[n], kd[n],
    peer[n], correct[n], stop], each a batch mean times the batch size. `read` all-reduces (so
    every rank sees every rank's samples and stop request) and syncs."""

    def __init__(self, num_students: int, device: torch.device):
        self.n = num_students
        self.sums = torch.zeros(4 + 4 * num_students, dtype=torch.float64, device=device)

    def add(self, parts: dict[str, Tensor], batch: int) -> None:
        vec = torch.cat(
            [
                parts["loss"].detach().reshape(1).double() * batch,
                parts["w"].detach().double().sum().reshape(1),
                parts["ce"].detach().double().reshape(-1) * batch,
                parts["kd"].detach().double().reshape(-1) * batch,
                parts["peer"].detach().double().reshape(-1) * batch,
                parts["correct"].double(),
            ]
        )
        self.sums[0] += batch
        self.sums[1:-1] += vec

    def read(self, stop: bool = False) -> dict:
        """Window means over all ranks, then reset; "stop" is True when any rank asked to stop.
        The host sync of the loop."""
        if stop:
            self.sums[-1] = 1.0
        values = distributed.all_reduce_sum(self.sums.clone()).tolist()
        self.sums.zero_()
        samples = max(values[0], 1.0)
        n = self.n

        def part(i):
            return [v / samples for v in values[3 + i * n : 3 + (i + 1) * n]]

        return {
            "samples": int(values[0]),
            "stop": values[-1] > 0,
            "loss": values[1] / samples,
            "w_mean": values[2] / samples,
            "ce": part(0),
            "kd": part(1),
            "peer": part(2),
            "train_top1": [100.0 * v for v in part(3)],
        }


class Trainer:
    """Builds loaders, networks, optimizer from `cfg`; `fit()` runs and reports; `step()` is
    one iteration. `train_loader`/`val_loader` may be passed in (tests); `resume` is a loaded
    last.pt dict."""

    def __init__(self, cfg: TrainConfig, train_loader=None, val_loader=None, resume: dict | None = None):
        self.cfg = cfg
        check_runnable(cfg)
        self.dist = distributed.init(resolve_device(cfg.run.device).type)
        self.device = resolve_device(cfg.run.device, self.dist.local_rank)
        self.is_main = self.dist.is_main
        self.run_dir = Path(cfg.run.out)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.amp_dtype = amp_dtype(cfg.precision.amp, self.device)
        if cfg.compile.mode == "cudagraphs" and self.device.type != "cuda":
            raise FastKDError("compile.mode cudagraphs needs CUDA; use none or inductor on CPU")
        if cfg.model.sync_bn and self.dist.enabled and self.device.type != "cuda":
            raise FastKDError("model.sync_bn needs CUDA (SyncBatchNorm has no CPU kernel)")
        _set_determinism(cfg.run.deterministic)
        _seed_all(cfg.run.seed)

        if train_loader is None:
            train_loader = self._build_loader("train", self._resolution(0))
        if val_loader is None:
            val_loader = self._build_loader("val", cfg.data.val_resolution)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.manifest = self.train_loader.manifest
        self.num_classes = int(self.train_loader.num_classes)

        self.names = network_names(cfg.model.students)
        self.archs = dict(zip(self.names, cfg.model.students))
        self._build_networks()
        self._build_optimizer()
        self.meter = StepMeter(len(self.names), self.device)

        self.epoch = 0  # next epoch to run
        self.step_in_epoch = 0  # steps of `epoch` already done (Ctrl-C checkpoint)
        self.global_step = 0
        self.best_top1 = {name: -1.0 for name in self.names}
        self.last_eval: dict | None = None
        self.teacher_eval: dict | None = None
        self._resume_rng = None
        self._stop = False
        self._train_time = 0.0
        self._train_samples = 0
        if resume is not None:
            self._load(resume)

    # ------------------------------------------------------------------ building blocks

    def _build_networks(self) -> None:
        """Students (one module, DDP over ranks, optional SyncBN, compiled forwards) and the
        frozen teacher (outside DDP)."""
        cfg, cl = self.cfg, self.cfg.precision.channels_last
        nets = [build_model(a, self.num_classes, channels_last=cl).to(self.device) for a in cfg.model.students]
        self.students = Students(nets)
        if cfg.model.sync_bn and self.dist.enabled:
            self.students = nn.SyncBatchNorm.convert_sync_batchnorm(self.students)
        self.students.set_compile(cfg.compile.mode)
        self.teacher = None
        if cfg.loss.method in TEACHER_METHODS:
            self.teacher = load_teacher(cfg.model.teacher_weights, cfg.model.teacher, self.manifest, cl)
            self.teacher = compile_module(self.teacher.to(self.device), cfg.compile.mode)
        self.ddp = self.students
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.students, device_ids=ids)
        _seed_all(cfg.run.seed + self.dist.rank)  # dropout masks differ across ranks

    def _build_optimizer(self) -> None:
        """SGD over both students, the per-iteration schedule's constants, the fp16 scaler, the loss."""
        from fastkd.losses import LossConfig

        cfg = self.cfg
        self.steps_per_epoch = distributed.all_reduce_min(len(self.train_loader), self.device)
        if self.steps_per_epoch < 1:
            raise FastKDError(
                f"data.batch_size {cfg.data.batch_size} x {self.dist.world_size} ranks leaves no full "
                f"batch in {cfg.data.dir} train; lower --batch-size"
            )
        self.total_steps = self.steps_per_epoch * cfg.schedule.epochs
        self.warmup_steps = round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        self.peak_lr = scaled_lr(cfg.optim.lr, cfg.data.batch_size, self.dist.world_size)
        self.optimizer = torch.optim.SGD(
            param_groups(self.students, cfg.optim.weight_decay),
            lr=self.peak_lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        lc = cfg.loss
        self.loss_cfg = LossConfig.from_method(
            lc.method, temperature=lc.temperature, entropy_temperature=lc.entropy_temperature,
            a_ce=lc.a_ce, a_kd=lc.a_kd, a_peer=lc.a_peer, label_smoothing=lc.label_smoothing,
        )  # fmt: skip

    def _resolution(self, epoch: int) -> int:
        d = self.cfg.data
        return resolution_at(
            epoch, self.cfg.schedule.epochs, d.min_resolution, d.max_resolution, d.resolution, d.ramp_end_epoch
        )

    def _build_loader(self, split: str, resolution: int):
        from fastkd.data import build_loader

        d = self.cfg.data
        dtype = self.amp_dtype if (self.device.type == "cuda" and self.amp_dtype) else torch.float32
        return build_loader(
            d.dir, split, d.backend, d.batch_size, resolution, self.device, dtype,
            rank=self.dist.rank, world_size=self.dist.world_size, seed=self.cfg.run.seed,
            num_workers=d.num_workers,
        )  # fmt: skip

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def student_modules(self) -> dict[str, nn.Module]:
        return dict(zip(self.names, self.students.nets))

    # ------------------------------------------------------------------ the step

    def step(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """One optimizer step on one batch; returns the loss parts plus `correct` [n_students]
        (all device tensors, nothing read back)."""
        from fastkd.losses import distillation_loss

        teacher_logits = None
        with self._autocast():
            if self.teacher is not None:
                with torch.inference_mode():
                    t = self.teacher(images)
                teacher_logits = t.float().clone()  # a normal tensor, usable outside inference mode
            logits = self.ddp(images)
        logits = [s.float() for s in logits]
        parts = distillation_loss(teacher_logits, logits, labels, self.loss_cfg, fused=self.cfg.loss.fused)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            parts["correct"] = torch.stack([(s.argmax(dim=1) == labels).sum() for s in logits])
        return parts

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to schedule.epochs (or run.stop_after), evaluating and checkpointing each epoch.
        Returns the summary written to report.json. Raises Interrupted after Ctrl-C/SIGTERM (a
        checkpoint saved) and NonFiniteLoss (no checkpoint written)."""
        from fastkd.report import LiveDisplay, MetricsLog

        cfg = self.cfg
        start = time.perf_counter()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        end_epoch = min(cfg.schedule.epochs, cfg.run.stop_after or cfg.schedule.epochs)
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.is_main)
        live = LiveDisplay(enabled=self.is_main and cfg.run.live, total_epochs=cfg.schedule.epochs)
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng[self.dist.rank % len(self._resume_rng)])
        with self.log, live, _stop_signals(self):
            while self.epoch < end_epoch:
                epoch = self.epoch
                done = self._train_epoch(epoch, live)
                if done < self.steps_per_epoch:  # stop requested inside the epoch (ranks agree)
                    self.step_in_epoch = done
                    path = self.save_last()
                    live.print(f"interrupted at epoch {epoch + 1} step {done}: saved {path}")
                    raise Interrupted(path)
                self.epoch, self.step_in_epoch = epoch + 1, 0
                res = None
                if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == end_epoch:
                    res = self.evaluate(epoch)
                self.save_last()
                live.end_epoch(res)
                if distributed.any_rank(self._stop, self.device) and self.epoch < end_epoch:
                    raise Interrupted(self.ckpt_dir / "last.pt" if self.is_main else None)
        summary = self.summary(time.perf_counter() - start)
        if self.is_main:
            from rich.console import Console

            from fastkd.report import summary_table, write_report

            write_report(self.run_dir, summary)
            if cfg.run.live:
                Console().print(summary_table(summary))
        distributed.barrier()
        return summary

    def _train_epoch(self, epoch: int, live) -> int:
        """Steps of one epoch (skipping those a Ctrl-C checkpoint already did); returns the
        number of steps done, < steps_per_epoch when a stop was requested."""
        cfg = self.cfg
        self.train_loader.set_epoch(epoch)
        self.train_loader.set_resolution(self._resolution(epoch))
        self.students.train()
        live.start_epoch(epoch, self.steps_per_epoch)
        skip, self.step_in_epoch = self.step_in_epoch, 0
        window_start = time.perf_counter()
        done = skip
        lr = self.optimizer.param_groups[0]["lr"]
        for i, (images, labels) in enumerate(self.train_loader):
            if i >= self.steps_per_epoch:
                break
            if i < skip:
                continue
            lr = lr_at(self.global_step, self.total_steps, self.warmup_steps, self.peak_lr, cfg.schedule.shape)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            parts = self.step(images, labels)
            self.meter.add(parts, labels.shape[0])
            self.global_step += 1
            done = i + 1
            # one process stops after the step in flight; ranks agree on a stop at a log read
            stop_now = self._stop and not self.dist.enabled
            if done % cfg.run.log_every == 0 or done == self.steps_per_epoch or stop_now:
                now = time.perf_counter()
                if self._log_window(epoch, done, lr, now - window_start, live):
                    self._stop = True
                    break
                window_start = time.perf_counter()
        return done

    def _log_window(self, epoch: int, done: int, lr: float, seconds: float, live) -> bool:
        """Read, check, log the window since the last read; True when a stop was requested."""
        window = self.meter.read(stop=self._stop)
        if not math.isfinite(window["loss"]):
            last = self.ckpt_dir / "last.pt"
            kept = f"last good checkpoint: {last}" if last.exists() else "no checkpoint written yet"
            raise NonFiniteLoss(
                f"non-finite training loss ({window['loss']}) at epoch {epoch + 1}, step {done}; "
                f"stopped, {kept}. Try a lower --optim.lr or --precision.amp fp32/bf16"
            )
        self._train_time += seconds
        self._train_samples += window["samples"]
        ips = window["samples"] / seconds if seconds > 0 else 0.0
        record = {"kind": "step", "epoch": epoch, "step": self.global_step, "lr": lr, "images_per_s": ips,
                  "world_size": self.dist.world_size, "samples": window["samples"], "loss": window["loss"]}  # fmt: skip
        record["ce"] = dict(zip(self.names, window["ce"]))
        if self.teacher is not None:
            record["kd"] = dict(zip(self.names, window["kd"]))
            record["w_mean"] = window["w_mean"]
        if self.cfg.loss.method in PEER_METHODS:
            record["peer"] = dict(zip(self.names, window["peer"]))
        record["train_top1"] = dict(zip(self.names, window["train_top1"]))
        self.log.write(record)
        live.update(done, {"loss": window["loss"], "lr": lr}, ips)
        return window["stop"]

    def evaluate(self, epoch: int) -> dict:
        """Val metrics of the students (and, once per invocation, the teacher); logged. The
        global RNG is left as it was, so evaluating never changes what training does next."""
        from fastkd.evaluate import evaluate

        state = rng_state()
        teacher = self.teacher if self.teacher_eval is None else None
        res = evaluate(self.student_modules(), self.val_loader, teacher=teacher,
                       w_temperature=self.cfg.loss.entropy_temperature)  # fmt: skip
        set_rng_state(state)
        if teacher is not None:
            self.teacher_eval = {k: res[k] for k in ("teacher", "teacher_w") if k in res}
        elif self.teacher_eval:
            res.update(self.teacher_eval)
        self.log.write({"kind": "eval", "epoch": epoch, "step": self.global_step, **res})
        self.last_eval = res
        for name, net in self.student_modules().items():
            if res[name]["top1"] > self.best_top1[name]:
                self.best_top1[name] = res[name]["top1"]
                if self.is_main:
                    save_atomic(plain_state_dict(net), self.ckpt_dir / f"best-{name}.pt")
        return res

    # ------------------------------------------------------------------ checkpoints

    def save_last(self) -> Path | None:
        """Full state to checkpoints/last.pt (rank 0; all ranks join the RNG gather)."""
        rngs = distributed.all_gather_objects(rng_state())
        if not self.is_main:
            return None
        state = build_last(
            epoch=self.epoch,
            step_in_epoch=self.step_in_epoch,
            global_step=self.global_step,
            archs=self.archs,
            models={name: net.state_dict() for name, net in self.student_modules().items()},
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            best_top1=self.best_top1,
            rng=rngs,
            loader={"seed": self.cfg.run.seed, "epoch": self.epoch},
            world_size=self.dist.world_size,
            num_classes=self.num_classes,
            classes=self.manifest["classes"],
            teacher={"arch": self.cfg.model.teacher, "weights": self.cfg.model.teacher_weights}
            if self.teacher is not None
            else None,
            config=config_to_dict(self.cfg),
        )
        path = self.ckpt_dir / "last.pt"
        save_atomic(state, path)
        return path

    def _load(self, ckpt: dict) -> None:
        if ckpt["archs"] != self.archs:
            raise FastKDError(f"resume: checkpoint networks {ckpt['archs']} differ from model.students {self.archs}")
        if ckpt["num_classes"] != self.num_classes:
            raise FastKDError(f"resume: checkpoint has {ckpt['num_classes']} classes, the data {self.num_classes}")
        for name, net in self.student_modules().items():
            net.load_state_dict(ckpt["models"][name])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = ckpt["epoch"]
        self.step_in_epoch = ckpt["step_in_epoch"]
        self.global_step = ckpt["global_step"]
        self.best_top1 = dict(ckpt["best_top1"])
        self._resume_rng = ckpt["rng"]  # applied when fit starts, after everything is built

    # ------------------------------------------------------------------ report

    def summary(self, wall_time: float) -> dict:
        res = self.last_eval or {}
        networks = {}
        for name, net in self.student_modules().items():
            r = res.get(name, {})
            networks[name] = {"arch": self.archs[name], "params": count_params(net), "top1": r.get("top1"),
                              "top5": r.get("top5"), "ece": r.get("ece"), "best_top1": self.best_top1[name]}  # fmt: skip
        teacher = None
        if self.teacher is not None:
            t = (self.teacher_eval or {}).get("teacher", {})
            teacher = {"arch": self.cfg.model.teacher, "params": count_params(self.teacher),
                       "top1": t.get("top1"), "top5": t.get("top5"), "ece": t.get("ece")}  # fmt: skip
        return {
            "method": self.cfg.loss.method,
            "networks": networks,
            "teacher": teacher,
            "images_per_s": self._train_samples / self._train_time if self._train_time else None,
            "wall_time_s": wall_time,
            "epochs": self.epoch,
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "config": config_to_dict(self.cfg),
        }


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_determinism(on: bool) -> None:
    """Process-wide switches, set both ways so a later run in the same process is not affected."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = not on
    torch.backends.cudnn.deterministic = on


@contextlib.contextmanager
def _stop_signals(trainer: Trainer):
    """SIGINT/SIGTERM ask the loop to stop after the current step (checkpoint, clean exit); a
    second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        if trainer._stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer._stop = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

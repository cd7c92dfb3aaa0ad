"""The trainer: epochs of the one training step (`fastkd.step`), evaluation, checkpoints, resume.

    trainer = Trainer(cfg)            # cfg: fastkd.config.TrainConfig
    summary = trainer.fit()           # epochs, evals, checkpoints, metrics.jsonl, report
    parts = trainer.step(images, labels)   # one optimizer step; dict of device tensors
    res = trainer.evaluate()          # val metrics of every network, usable on its own

The schedule's position is (epochs done, steps of the current epoch done), so it does not depend
on the number of ranks (`global_step`, the optimizer steps taken, is only the metrics' x axis):
a run resumed at an epoch boundary under another world size or batch size continues the lr
curve where it stopped (a per-256 lr is rescaled to the new global batch; the change is
logged); a mid-epoch checkpoint resumes only under the world size and batch size that made it
(exact), anything else is refused with both named (fastkd/resume.py). Each step seeds the global
generator from (seed, rank, epoch, step), so dropout masks after a resume are the ones the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import torch
from torch import Tensor, nn

from fastkd import distributed
from fastkd.user_modules import config_for_modules
from fastkd.cache_run import feed_for_run
from fastkd.checkpoint import plain_state_dict, rng_state, save_atomic, set_rng_state
from fastkd.config import TrainConfig, check_runnable, config_to_dict, save_config
from fastkd.data import build_loader
from fastkd.data.spec import val_pipeline
from fastkd.data.contract import start_pass
from fastkd.divergence import LossGuard, NonFiniteLoss  # noqa: F401 (NonFiniteLoss re-exported)
from fastkd.errors import FastKDError
from fastkd.evaluate import evaluate
from fastkd.live import LiveDisplay
from fastkd.loggers import build_loggers
from fastkd.metrics import MetricsLog, NullLog
from fastkd.models import build_model, count_params, load_student_weights, load_teacher, network_names
from fastkd.notes import say
from fastkd.report import report_arch, summary_table, write_report
from fastkd.resume import last_state, restore
from fastkd.run_dir import claim
from fastkd.run_layout import RunLayout
from fastkd.runtime import CUDA_ONLY_MODES, base_index, input_dtype, resolve_compile_mode, resolve_device
from fastkd.runtime import seed_all, set_determinism, step_seed, stop_signals
from fastkd.schedule import lr_at, peak_lr, resolution_at
from fastkd.step import build_step, warm_for_schedule
from fastkd.train_state import TrainState
from fastkd.tables import print_table


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: a checkpoint was saved; `path` says where (None on ranks > 0);
    `exit_code` is 128 + the signal (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, path: Path | None, signum: int = signal.SIGINT):
        super().__init__(f"interrupted; checkpoint {path}")
        self.path, self.exit_code = path, 128 + int(signum)


class Trainer:
    """Builds loaders, networks, the step from `cfg`; `fit()` runs and reports; `step()` is one
    iteration. `train_loader`/`val_loader` may be passed in (tests); `resume` is a loaded last.pt
    dict."""

    def __init__(self, cfg: TrainConfig, train_loader=None, val_loader=None, resume: dict | None = None, *,
                 students=None, teacher: nn.Module | None = None):  # fmt: skip
        """`students`: your own networks ({name: module} or [modules]) instead of model.students;
        `teacher`: your own frozen teacher module instead of model.teacher + teacher_weights."""
        if students is not None:
            cfg = config_for_modules(cfg, students, teacher)
        self.cfg = cfg
        check_runnable(cfg, has_data=train_loader is not None and val_loader is not None,
                       has_teacher=teacher is not None)  # fmt: skip
        self.dist = distributed.init(resolve_device(cfg.run.device).type, base_index(cfg.run.device))
        self.device = resolve_device(cfg.run.device, self.dist.local_rank)
        self.is_main = self.dist.is_main
        self.run_dir = Path(cfg.run.out)
        self.layout = RunLayout(self.run_dir)  # checkpoints/, config.yaml, metrics.jsonl
        # compile.mode auto: the whole step in CUDA graphs on one GPU, eager on CPU and under DDP
        self.compile_mode, self.compile_note = resolve_compile_mode(cfg.compile.mode, self.device, self.dist.enabled)
        if self.compile_mode in CUDA_ONLY_MODES and self.device.type != "cuda":
            raise FastKDError(f"compile.mode {self.compile_mode} needs CUDA; use none or inductor on CPU")
        if cfg.model.sync_bn and self.dist.enabled and self.device.type != "cuda":
            raise FastKDError("model.sync_bn needs CUDA (SyncBatchNorm has no CPU kernel)")
        set_determinism(cfg.run.deterministic)
        seed_all(cfg.run.seed)

        cached = bool(cfg.model.teacher_cache)  # the teacher's logits come from a cache
        if train_loader is None:
            train_loader = self._build_loader("train", self._resolution(0), return_indices=cached)
        if val_loader is None:
            val_loader = self._build_loader("val", cfg.data.val_resolution)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.manifest = self.train_loader.manifest
        self.num_classes = int(self.train_loader.num_classes)
        self.names = list(students) if isinstance(students, dict) else network_names(cfg.model.students)
        self.archs = dict(zip(self.names, cfg.model.students))
        self.cache_feed = None
        if cached:  # checked against the run (sampled chunk checksums too); the config names its teacher
            resolutions = {self._resolution(e) for e in range(cfg.schedule.epochs)}
            self.cache_feed, self.cfg = feed_for_run(cfg, self.train_loader, resolutions, self.device)
            cfg = self.cfg

        self.steps_per_epoch = distributed.all_reduce_min(len(self.train_loader), self.device)
        if self.steps_per_epoch < 1:
            raise FastKDError(
                f"data.batch_size {cfg.data.batch_size} x {self.dist.world_size} ranks leaves no full "
                f"batch in {cfg.data.dir} train; lower --batch-size"
            )
        self.total_steps = self.steps_per_epoch * cfg.schedule.epochs
        self.warmup_steps = round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        self.peak_lr, self.peak_lr_how = peak_lr(cfg, self.dist.world_size)
        self.loss_guard = LossGuard(cfg.optim.name, self.peak_lr_how)  # NaN/inf or exploded window loss
        nets = self._student_nets(students)
        teacher = self._frozen(teacher) if teacher is not None else self._load_teacher()
        self.train_step = build_step(cfg, self.num_classes, self.device, teacher=teacher, lr=self.peak_lr,
                                     ddp=self.dist.enabled, nets=nets, live_teacher=not cached)  # fmt: skip
        seed_all(cfg.run.seed + self.dist.rank)

        # position, counters, bests: the one owner (fastkd.train_state); last.pt saves its state_dict
        self.state = TrainState(best_top1={name: -1.0 for name in self.names}, run_id=uuid.uuid4().hex[:12])
        self.last_eval: dict | None = None
        self.teacher_eval: dict | None = None
        self.resume_notes: list[str] = []  # what a resume changed (world size, lr, schedule)
        self._stop = False
        self._stop_signum = signal.SIGINT  # the first stop signal this process got
        self.log = NullLog()
        self._resumed = resume is not None
        # checks first (fastkd.resume), then weights, optimizer, position; each rank's RNG states
        # of the checkpoint (None under another world size) are applied when fit starts
        self._resume_rng = restore(self, resume) if resume is not None else None

    # ------------------------------------------------------------------ building blocks

    def _load_teacher(self):
        """The frozen teacher when the method distils from one, loaded without touching the run's
        random state (students are initialised exactly as without a teacher)."""
        if not self.cfg.loss.uses_teacher or self.cfg.model.teacher_cache:
            return None
        m = self.cfg.model
        with torch.random.fork_rng(devices=[]):
            return load_teacher(m.teacher_weights, m.teacher, self.manifest, self.cfg.precision.channels_last)

    def _student_nets(self, students) -> list[nn.Module]:
        """The student networks: the user's modules, or new model.students with the initial
        weights model.student_weights names (NET=PATH)."""
        if students is not None:
            return list(students.values()) if isinstance(students, dict) else list(students)
        cl = self.cfg.precision.channels_last
        nets = [build_model(a, self.num_classes, channels_last=cl) for a in self.cfg.model.students]
        if self.cfg.model.student_weights:
            load_student_weights(dict(zip(self.names, nets)), self.cfg.model.student_weights, self.manifest)
        return nets

    def _frozen(self, teacher: nn.Module) -> nn.Module:
        """A user's teacher module in eval mode, without gradients, in the run's memory format."""
        fmt = torch.channels_last if self.cfg.precision.channels_last else torch.contiguous_format
        return teacher.eval().requires_grad_(False).to(memory_format=fmt)

    def _resolution(self, epoch: int) -> int:
        d = self.cfg.data
        return resolution_at(
            epoch, self.cfg.schedule.epochs, d.min_resolution, d.max_resolution, d.resolution, d.ramp_end_epoch
        )

    def _build_loader(self, split: str, resolution: int, return_indices: bool = False):
        d = self.cfg.data
        dtype = input_dtype(self.cfg.precision.amp, self.device)
        options = {"decode": d.decode} if d.decode != "auto" else {}  # torch backend only (config.validate)
        return build_loader(
            d.dir, split, d.backend, d.batch_size, resolution, self.device, dtype,
            rank=self.dist.rank, world_size=self.dist.world_size, seed=self.cfg.run.seed,
            num_workers=d.num_workers, return_indices=return_indices, **options,
        )  # fmt: skip

    # read access for callers of the Trainer: the step's parts, the run's position
    students = property(lambda self: self.train_step.students)
    teacher = property(lambda self: self.train_step.teacher)
    scaler = property(lambda self: self.train_step.scaler)
    meter = property(lambda self: self.train_step.meter)
    ema = property(lambda self: self.train_step.ema)
    epoch = property(lambda self: self.state.epoch)
    global_step = property(lambda self: self.state.global_step)

    def student_modules(self) -> dict:
        return dict(zip(self.names, self.students.nets))

    def eval_modules(self) -> dict:
        """What each evaluation scores: the students, and their EMA as `<name>-ema` when on."""
        nets = self.student_modules()
        if self.ema is not None:
            nets.update({f"{name}-ema": net for name, net in self.ema.modules().items()})
        return nets

    def step(self, images: Tensor, labels: Tensor, seed: int | None = None) -> dict[str, Tensor]:
        """One optimizer step on one batch (`fastkd.step.TrainStep`); device tensors only."""
        return self.train_step(images, labels, seed=seed)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to schedule.epochs (or run.stop_after), evaluating and checkpointing each epoch.
        Returns the summary written to report.json. Raises Interrupted after Ctrl-C/SIGTERM (a
        checkpoint saved) and NonFiniteLoss. Every entry point locks and checks the run dir here."""
        at = (self.state.global_step, self.state.epoch) if self._resumed else None  # a resume drops later records
        with claim(self.run_dir, resumed_at=at, overwrite=self.cfg.run.overwrite, enabled=self.is_main):
            return self._fit()

    def _fit(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        if self.is_main:
            save_config(cfg, self.layout.config)
        end_epoch = min(cfg.schedule.epochs, cfg.run.stop_after or cfg.schedule.epochs)
        sinks = build_loggers(cfg.run.log, self.run_dir, config_to_dict(cfg), self.is_main)  # TensorBoard, W&B
        self.log = MetricsLog(self.layout.metrics, enabled=self.is_main, sinks=sinks)
        live = LiveDisplay(enabled=self.is_main and cfg.run.live, total_epochs=cfg.schedule.epochs)
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng[self.dist.rank % len(self._resume_rng)])
        with self.log, live, stop_signals(self._request_stop):
            say(f"fastkd train: {self.peak_lr_how}")
            if self.cache_feed is not None:  # no teacher forward: say whose logits train the students
                say(f"fastkd train: {self.cache_feed.describe()}")
            for note in self.resume_notes:
                say(f"fastkd train: resume: {note}")
            if self._resumed:  # where a resume starts: loggers drop what they had logged past it
                self.log.write({"kind": "resume", "epoch": self.state.epoch, "step": self.state.global_step,
                                "world_size": self.dist.world_size, "notes": self.resume_notes})  # fmt: skip
            self._warm_compile(end_epoch, live)
            while self.state.epoch < end_epoch:
                epoch = self.state.epoch
                done = self._train_epoch(epoch, live)
                if done < self.steps_per_epoch:  # stop requested inside the epoch (ranks agree)
                    self.state.step_in_epoch = done
                    path = self.save_last()
                    say(f"fastkd train: interrupted at epoch {epoch + 1} step {done}: saved {path}")
                    raise Interrupted(path, self._stop_signum)
                self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
                res = None
                if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == end_epoch:
                    res = self.evaluate(epoch)
                self.save_last()
                live.end_epoch(res)
                if distributed.any_rank(self._stop, self.device) and self.state.epoch < end_epoch:
                    raise Interrupted(self.layout.last if self.is_main else None, self._stop_signum)
        summary = self.summary(time.perf_counter() - start)
        if self.is_main:
            write_report(self.run_dir, summary)
            if cfg.run.summary:  # printed with or without the live display
                print_table(summary_table(summary))  # at its natural width, whatever the terminal's
        distributed.barrier()
        return summary

    def _warm_compile(self, end_epoch: int, live) -> None:
        """Every train resolution of epochs [epoch, end_epoch) compiled now (`warm_for_schedule`),
        each logged as a `compile` record, so no epoch's images/s carries a compile."""
        cfg = self.cfg
        if self.compile_note:
            say(f"fastkd train: {self.compile_note}")
        resolutions = sorted({self._resolution(e) for e in range(self.state.epoch, end_epoch)})
        batch = int(getattr(self.train_loader, "batch_size", None) or cfg.data.batch_size)  # per rank
        dtype = input_dtype(cfg.precision.amp, self.device)
        for res, seconds in warm_for_schedule(self.train_step, resolutions, batch, dtype, cfg).items():
            self.state.compile_seconds[res] = seconds
            self.log.write({"kind": "compile", "epoch": self.state.epoch, "step": self.state.global_step, "resolution": res,
                            "batch_size": batch, "seconds": seconds})  # fmt: skip
            say(f"fastkd train: compiled the step ({self.compile_mode}) for batches of {batch} x {res} px in {seconds:.1f} s")

    def _train_epoch(self, epoch: int, live) -> int:
        """Steps of one epoch, from step_in_epoch (a Ctrl-C checkpoint's position) on; returns the
        number of steps done, < steps_per_epoch when a stop was requested."""
        cfg = self.cfg
        start = self.state.step_in_epoch
        first = start_pass(self.train_loader, epoch, start)  # batch index the loader yields first
        self.train_loader.set_resolution(self._resolution(epoch))
        self.students.train()
        live.start_epoch(epoch, self.steps_per_epoch)
        self.state.step_in_epoch = 0
        done = start
        lr = self.train_step.optimizer.param_groups[0]["lr"]
        window_start = time.perf_counter()
        for i, batch in enumerate(self.train_loader, start=first):
            if i >= self.steps_per_epoch:
                break
            if i < start:  # a loader that cannot start mid-pass: skip what the checkpoint did
                window_start = time.perf_counter()
                continue
            position = epoch * self.steps_per_epoch + i  # of the schedule, under this world size
            lr = lr_at(position, self.total_steps, self.warmup_steps, self.peak_lr, cfg.schedule.shape,
                       cfg.schedule.min_lr)  # fmt: skip
            self.train_step.set_lr(lr)
            images, labels = batch[0], batch[1]
            cached = self.cache_feed.teacher_logits(epoch, batch[2]) if self.cache_feed else None  # [B, C]
            parts = self.train_step(images, labels, seed=step_seed(cfg.run.seed, self.dist.rank, epoch, i),
                                    teacher_logits=cached)  # fmt: skip
            self.meter.add(parts, labels.shape[0])
            self.state.global_step += 1
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
        self.loss_guard.check(window["loss"], epoch=epoch, step=done, lr=lr, last=self.layout.last)
        self.state.add_window(window["samples"], seconds)
        ips = window["samples"] / seconds if seconds > 0 else 0.0
        record = {"kind": "step", "epoch": epoch, "step": self.state.global_step, "lr": lr, "images_per_s": ips,
                  "world_size": self.dist.world_size, "samples": window["samples"],
                  "samples_seen": self.state.samples_seen, "loss": window["loss"]}  # fmt: skip
        record["ce"] = dict(zip(self.names, window["ce"]))
        if self.cfg.loss.uses_teacher:  # a live teacher or a teacher cache
            record["kd"] = dict(zip(self.names, window["kd"]))
            record["w_mean"] = window["w_mean"]
        if self.cfg.loss.uses_peer:
            record["peer"] = dict(zip(self.names, window["peer"]))
        record["train_top1"] = dict(zip(self.names, window["train_top1"]))
        self.log.write(record)
        live.update(done, {"loss": window["loss"], "lr": lr}, ips)
        return window["stop"]

    def evaluate(self, epoch: int | None = None) -> dict:
        """Val metrics of the students (and, once per invocation, the teacher); logged to
        metrics.jsonl inside fit(). The global RNG is left as it was, so evaluating never changes
        what training does next. `epoch` (0-based) labels the record; default: the last one done."""
        epoch = self.state.epoch - 1 if epoch is None else epoch
        state = rng_state()
        teacher = self.teacher if self.teacher_eval is None else None
        res = evaluate(self.eval_modules(), self.val_loader, teacher=teacher,
                       w_temperature=self.cfg.loss.entropy_temperature)  # fmt: skip
        set_rng_state(state)
        if teacher is not None:
            self.teacher_eval = {k: res[k] for k in ("teacher", "teacher_w") if k in res}
        elif self.teacher_eval:
            res.update(self.teacher_eval)
        self.log.write({"kind": "eval", "epoch": epoch, "step": self.state.global_step, **res})
        self.last_eval = res
        for name, net in self.eval_modules().items():
            if self.state.improves(name, res[name]["top1"]) and self.is_main:
                save_atomic(plain_state_dict(net), self.layout.best(name))
        return res

    # ------------------------------------------------------------------ checkpoints

    def save_last(self) -> Path | None:
        """Full state to checkpoints/last.pt (rank 0; all ranks join the RNG gather)."""
        rngs = distributed.all_gather_objects(rng_state())
        if not self.is_main:
            return None
        path = self.layout.last
        save_atomic(last_state(self, rngs), path)
        return path

    def _request_stop(self, signum: int) -> None:
        """SIGINT/SIGTERM: stop after the current step (checkpoint, clean exit); a second SIGINT
        interrupts at once."""
        if self._stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self._stop:
            self._stop_signum = signum
        self._stop = True

    # ------------------------------------------------------------------ report

    def summary(self, wall_time: float) -> dict:
        """What report.json holds (rendered by fastkd.report): per network its architecture,
        parameter count, last and best accuracy (and its EMA's); the teacher's; the training
        rate; whether the run completed its epochs."""
        cfg, res, best, networks = self.cfg, self.last_eval or {}, self.state.best_top1, {}
        for name, net in self.student_modules().items():
            r = res.get(name, {})
            networks[name] = {"arch": report_arch(self.archs[name]), "params": count_params(net), "top1": r.get("top1"),
                              "top5": r.get("top5"), "ece": r.get("ece"), "best_top1": best[name]}  # fmt: skip
            if self.ema is not None:  # evaluated as "<name>-ema" (eval_modules)
                e = res.get(f"{name}-ema", {})
                networks[name].update(ema_top1=e.get("top1"), ema_top5=e.get("top5"), ema_best_top1=best.get(f"{name}-ema"))
        t, teacher = (self.teacher_eval or {}).get("teacher", {}), None
        if self.teacher is not None:
            teacher = {"arch": report_arch(cfg.model.teacher), "params": count_params(self.teacher),
                       "top1": t.get("top1"), "top5": t.get("top5"), "ece": t.get("ece")}  # fmt: skip
        return {"method": cfg.loss.method, "networks": networks, "teacher": teacher,
                "images_per_s": self.state.images_per_s(), "wall_time_s": wall_time,
                "compile_s": {str(r): sec for r, sec in self.state.compile_seconds.items()} or None,
                "compile_mode": self.compile_mode,  # compile.mode as resolved for this run
                "val_pipeline": val_pipeline(self.val_loader),  # what scored top-1: backends resize differently
                "epochs": self.state.epoch, "total_epochs": cfg.schedule.epochs,
                "finished": self.state.epoch >= cfg.schedule.epochs, "run_id": self.state.run_id,
                "world_size": self.dist.world_size, "device": str(self.device), "config": config_to_dict(cfg)}  # fmt: skip

"""The one training step: frozen teacher, one or two students, the loss, one optimizer update.

    step = build_step(cfg, num_classes=100, device=torch.device("cuda"))   # TrainConfig -> step
    step.set_lr(0.1)
    parts = step(images, labels, seed=step_seed(...))   # dict of device tensors, no host sync
    step.meter.add(parts, images.shape[0])              # device-side sums for the log window

What one call does, in order (the trainer, the benchmarks and the GPU check all run exactly this):
MixUp / CutMix of the batch when augment.mixup / augment.cutmix is on (`fastkd.recipe`; drawn on
the host from the step's seed), then `forward_loss`: teacher forward in eval mode under no_grad on
the same (mixed) images (fp32 logits), students forward in train mode under autocast (in DDP
when there are several ranks), student logits cast to fp32, `fastkd.losses.distillation_loss`
(the fused op unless loss.fused is false) and the per-student correct counts; then zero_grad,
backward through the GradScaler (fp16 only), gradient clipping per student when
optim.clip_grad_norm is set (after the scaler's unscale_), one optimizer update over both
students (SGD or AdamW, weight decay on conv/linear weights only; fused kernels on CUDA), and
the EMA update when ema.decay is set. Nothing is read back to the host: the loss parts,
accuracies and w stay on the device until `StepMeter.read`, the loop's one sync every
run.log_every steps.

Compilation (compile.mode, compile.scope). compile.mode auto (the default) is resolved by
`fastkd.runtime.resolve_compile_mode`: reduce-overhead on one CUDA device, none on CPU and under
DDP. Scope `step` (the default): `forward_loss` is compiled as one function, so teacher, students
and loss are one graph whose backward AOTAutograd compiles with it, with static shapes (one graph
per resolution; `warm` compiles, and records, a resolution ahead of training). reduce-overhead
and cudagraphs replay CUDA graphs: each call marks an iteration and copies the parts out. Scope `networks`: each
network is compiled alone and the loss runs eagerly between them. The optimizer update is never
traced: on CUDA it is torch's fused SGD / AdamW kernel (a few launches for every parameter;
whether tracing it would be faster has not been measured).

A mixed batch (lam, labels y_a and the rolled y_b): the loss is lam * L(y_a) + (1 - lam) * L(y_b)
exactly. Only the CE term depends on labels, so it is computed as L(y_a) + (1 - lam) * (CE(y_b) -
CE(y_a)) with lam a device tensor (a compiled step keeps one graph for every lam); `ce` reports
the mixed CE, `kd`, `peer` and `w` are as without mixing, and `correct` counts top-1 hits
against the dominant label (y_a when lam >= 0.5, else y_b).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import Tensor, nn

from fastkd import distributed
from fastkd.config import TrainConfig
from fastkd.frozen_teacher import as_frozen_teacher
from fastkd.losses import LossConfig, distillation_loss
from fastkd.models import build_model, network_names
from fastkd.recipe import AugmentConfig, MixParams, StudentsEMA, apply_mix, build_optimizer, draw_mix, load_optimizer_state
from fastkd.recipe import mix_rng
from fastkd.runtime import CUDA_ONLY_MODES, allow_graphs, compile_fn, resolve_compile_mode
from fastkd.runtime import amp_dtype as resolve_amp_dtype
from fastkd.schedule import peak_lr


class Students(nn.Module):
    """The students as one module (one DDP wrapper, one optimizer); forward -> [logits, ...],
    each [B, C]."""

    def __init__(self, nets: list[nn.Module], compile_mode: str = "none"):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.set_compile(compile_mode)

    def set_compile(self, mode: str) -> None:
        # compiled wrappers kept outside the module tree: state_dict keys stay torchvision's
        object.__setattr__(self, "_forwards", [compile_fn(n, mode) for n in self.nets])

    def forward(self, images: Tensor) -> list[Tensor]:
        return [f(images) for f in self._forwards]


class StepMeter:
    """Device-side sums over the steps since the last read: [samples, loss, w, ce[n], kd[n],
    peer[n], correct[n], stop], each a batch mean times the batch size. `read` all-reduces (so
    every rank sees every rank's samples and stop request) and syncs."""

    def __init__(self, num_students: int, device: torch.device):
        self.n = num_students
        self.sums = torch.zeros(4 + 4 * num_students, dtype=torch.float64, device=device)

    def add(self, parts: dict[str, Tensor], batch: int) -> None:
        vec = torch.cat([parts["loss"].detach().reshape(1).double() * batch, parts["w"].detach().double().sum().reshape(1),
                         *(parts[k].detach().double().reshape(-1) * batch for k in ("ce", "kd", "peer")),
                         parts["correct"].double()])  # fmt: skip
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


class TrainStep:
    """One optimizer step of the students (see the module docstring). `students` is the plain
    `Students` module (its state_dict is what checkpoints hold); `model` is what runs forward
    (the same module, or its DDP wrapper). `clip_grad_norm`: max gradient norm of each student
    (None: no clipping). `ema`: the students' EMA, updated after each optimizer update (None:
    off). `augment`: MixUp / CutMix settings (None: off); `mix_seed` seeds the mixing draws of
    calls made without a step seed (the benchmarks)."""

    def __init__(self, students: Students, teacher: nn.Module | None, loss: LossConfig,
                 optimizer: torch.optim.Optimizer, device: torch.device, amp_dtype: torch.dtype | None,
                 model: nn.Module | None = None, *, clip_grad_norm: float | None = None,
                 ema: StudentsEMA | None = None, augment: AugmentConfig | None = None,
                 mix_seed: int = 0, compile_mode: str = "none", num_classes: int | None = None,
                 networks_compiled: bool = False):  # fmt: skip
        self.students, self.teacher, self.loss = students, teacher, loss
        self.model = students if model is None else model
        self.optimizer, self.device, self.amp_dtype = optimizer, device, amp_dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.meter = StepMeter(len(students.nets), device)
        self.clip_grad_norm, self.ema = clip_grad_norm, ema
        self.augment = augment if augment is not None and augment.mixing else None
        self._mix_rng = mix_rng(mix_seed)  # only for calls without a seed
        self.last_mix: MixParams | None = None  # the last call's mixing (None: not mixed)
        self.num_classes = num_classes  # for `warm`'s synthetic labels
        # compile.scope step: forward_loss (teacher, students, loss, correct counts) is one
        # compiled graph; AOTAutograd compiles its backward with it
        self.compile_mode = compile_mode
        self.graphs = compile_mode in CUDA_ONLY_MODES  # forward_loss replays CUDA graphs
        self._forward_loss = compile_fn(self.forward_loss, compile_mode)
        self.compiled = compile_mode != "none" or networks_compiled  # something compiles at a new shape

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def seed(self, seed: int) -> None:
        """Seed this process's generators for this device only (dropout masks of the step):
        the CPU generator and, on CUDA, the current device's, never every GPU's."""
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def state_dict(self, names: list[str]) -> dict:
        """What last.pt keeps of the step, under its keys: "models" (`names[i]` -> state_dict of
        student i), "optimizer", "scaler", and "ema" when the EMA is on."""
        state = {"models": {name: net.state_dict() for name, net in zip(names, self.students.nets, strict=True)},
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}  # fmt: skip
        return state | ({"ema": self.ema.state_dict()} if self.ema is not None else {})

    def load_state_dict(self, state: dict, names: list[str]) -> None:
        """The inverse of state_dict; the optimizer keeps the kernels chosen for this device, an
        EMA missing on either side is left as it is (the caller says so)."""
        for name, net in zip(names, self.students.nets, strict=True):
            net.load_state_dict(state["models"][name])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])

    def __call__(self, images: Tensor, labels: Tensor, seed: int | None = None,
                 teacher_logits: Tensor | None = None) -> dict[str, Tensor]:  # fmt: skip
        """images [B, 3, r, r] (normalised, channels_last), labels [B] int64, both on the device;
        returns the loss parts (`loss` scalar, `ce`/`kd`/`peer` [n_students], `w` [B]) plus
        `correct` [n_students], all device tensors. `seed`: the step's generator seed.
        `teacher_logits` [B, C]: given (a teacher cache), the teacher does not run (refused
        when the batch is mixed: cached logits are of the unmixed images). With clipping on,
        parts also hold `grad_norm` [n_students], each student's norm before clipping."""
        if seed is not None:
            self.seed(seed)
        mix = self._draw_mix(seed, images)
        mixed = None
        if mix is not None:
            if teacher_logits is not None and self.loss.uses_teacher:
                raise ValueError("a mixed batch needs the teacher's forward on it; the given teacher "
                                 "logits are of the unmixed images")
            images, labels_b = apply_mix(images, labels, mix)
            mixed = self._mixed_inputs(labels_b, mix.lam)
        if teacher_logits is not None:
            teacher_logits = teacher_logits.float()
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the last one's graph outputs are free
        parts = self._forward_loss(images, labels, teacher_logits, mixed)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts["loss"]).backward()
        if self.graphs:  # outputs of a CUDA graph live until its next replay
            parts = {k: v.detach().clone() for k, v in parts.items()}
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # true gradients (fp16); a no-op otherwise
            parts["grad_norm"] = torch.stack(
                [nn.utils.clip_grad_norm_(net.parameters(), self.clip_grad_norm) for net in self.students.nets]
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            with torch.no_grad():
                self.ema.update()
        return parts

    def forward_loss(self, images: Tensor, labels: Tensor, teacher_logits: Tensor | None,
                     mixed: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:  # fmt: skip
        """Everything of one step up to the loss, as one function (compile.scope step compiles
        it whole): teacher forward unless `teacher_logits` [B, C] are given, students forward,
        the loss on fp32 logits, the correct counts. `mixed`: (labels_b [B], lam [] fp32) of a
        mixed batch (`_mixed_inputs`), else None. Returns the loss parts plus
        `correct` [n_students]."""
        with self.autocast():
            if self.teacher is not None and teacher_logits is None:
                with torch.no_grad():  # frozen; no_grad (not inference_mode) traces into one graph
                    teacher_logits = self.teacher(images).float()  # [B, C]
            logits = self.model(images)  # [[B, C]] per student
        logits = [s.float() for s in logits]
        if mixed is None:
            parts = distillation_loss(teacher_logits, logits, labels, self.loss, fused=self.loss.fused)
            target = labels
        else:
            labels_b, lam = mixed
            parts = self._mixed_loss(teacher_logits, logits, labels, labels_b, lam)
            target = torch.where(lam >= 0.5, labels, labels_b)  # the dominant label, chosen on the device
        with torch.no_grad():
            parts["correct"] = torch.stack([(s.argmax(dim=1) == target).sum() for s in logits])
        return parts

    def _draw_mix(self, seed: int | None, images: Tensor) -> MixParams | None:
        """This call's MixUp / CutMix (host-side draws; nothing drawn when mixing is off)."""
        mix = None
        if self.augment is not None:
            rng = mix_rng(seed) if seed is not None else self._mix_rng
            mix = draw_mix(self.augment, rng, images.shape[-2], images.shape[-1])
        self.last_mix = mix
        return mix

    def _mixed_inputs(self, labels_b: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        """forward_loss's `mixed` for a batch mixed with weight `lam` (labels_b: the rolled
        labels): lam as a device tensor made by a fill kernel (no host-to-device copy, and a
        compiled step keeps one graph whatever lam is)."""
        return labels_b, torch.full((), lam, dtype=torch.float32, device=labels_b.device)

    def _mixed_loss(self, teacher_logits: Tensor | None, logits: list[Tensor], labels: Tensor,
                    labels_b: Tensor, lam: Tensor) -> dict[str, Tensor]:  # fmt: skip
        """lam * L(y_a) + (1 - lam) * L(y_b) (module doc) as L(y_a) + (1 - lam) * (CE(y_b) -
        CE(y_a)): only CE depends on the labels, and lam stays a tensor."""
        fused = self.loss.fused
        parts = distillation_loss(teacher_logits, logits, labels, self.loss, fused=fused)
        ce_only = LossConfig(method="ce", a_ce=self.loss.a_ce, label_smoothing=self.loss.label_smoothing, fused=fused)
        ce_a = distillation_loss(None, logits, labels, ce_only, fused=fused)
        ce_b = distillation_loss(None, logits, labels_b, ce_only, fused=fused)
        other = 1.0 - lam
        parts["loss"] = parts["loss"] + other * (ce_b["loss"] - ce_a["loss"])
        parts["ce"] = parts["ce"] + other * (ce_b["ce"] - ce_a["ce"])
        return parts

    def warm(self, batch_size: int, resolution: int, dtype: torch.dtype, channels_last: bool = True) -> float:
        """Compile the step's graphs for [batch_size, 3, resolution, resolution] batches now,
        not in the first training step at that size; returns the seconds it took (compile time,
        reported apart from training speed). Runs forward_loss and its backward on random data,
        once per kind of batch the run will see (unmixed, mixed), then puts everything back:
        gradients cleared, BN statistics and the random generators restored, no optimizer
        update, no EMA update. 0.0 when nothing in the step is compiled."""
        if not self.compiled:
            return 0.0
        if self.num_classes is None:
            raise ValueError("TrainStep.warm needs num_classes (build_step sets it)")
        start = time.perf_counter()
        self.students.train()  # the mode training runs in (a graph is specialised on it)
        buffers = [b.detach().clone() for b in self.students.buffers()]
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            images = torch.randn(batch_size, 3, resolution, resolution, device=self.device).to(dtype)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = torch.randint(0, self.num_classes, (batch_size,), device=self.device)
            teacher_logits = None
            if self.teacher is None and self.loss.uses_teacher:  # a teacher cache feeds the logits
                teacher_logits = torch.randn(batch_size, self.num_classes, device=self.device)
            kinds = []
            if self.augment is None or self.augment.mix_prob < 1.0:
                kinds.append(None)
            if self.augment is not None:
                kinds.append(self._mixed_inputs(labels.roll(1, dims=0), 0.7))
            # CUDA graph trees run a new graph eagerly once, record it on the second call and
            # replay it from the third: warm takes the first two, so training only replays
            for mixed in kinds:
                for _ in range(2 if self.graphs else 1):
                    if self.graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    parts = self._forward_loss(images, labels, teacher_logits, mixed)
                    parts["loss"].backward()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for live, saved in zip(self.students.buffers(), buffers, strict=True):
                live.copy_(saved)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def warm_for_schedule(step: TrainStep, resolutions: list[int], batch: int, dtype: torch.dtype,
                      cfg: TrainConfig) -> dict[int, float]:  # fmt: skip
    """A compiled step keeps one graph per train resolution (static shapes; x2 with MixUp/CutMix):
    let torch.compile keep that many (past its limit it would run eagerly, silently) and, with
    compile.warm, compile each resolution now (`TrainStep.warm`). Returns {resolution: seconds}
    ({} when nothing compiles or compile.warm is off)."""
    if not step.compiled:
        return {}
    # per function: resolutions x (unmixed, mixed); scope networks: ResNet.forward serves the
    # teacher and a ResNet student alike
    allow_graphs(4 * len(resolutions) + 4)
    if not cfg.compile.warm:
        return {}
    return {res: step.warm(batch, res, dtype, cfg.precision.channels_last) for res in resolutions}


def build_students(cfg: TrainConfig, num_classes: int, device: torch.device, distributed_run: bool,
                   nets: list[nn.Module] | None = None, compile_mode: str = "none") -> Students:  # fmt: skip
    """The students on `device` (channels_last per config): `nets` when given (the user's
    modules, or networks with loaded weights), else randomly initialised model.students; SyncBN
    when asked and several ranks run, forwards compiled with `compile_mode` (resolved) under
    compile.scope networks."""
    cl = cfg.precision.channels_last
    if nets is None:
        nets = [build_model(a, num_classes, channels_last=cl) for a in cfg.model.students]
    fmt = torch.channels_last if cl else torch.contiguous_format
    students = Students([net.to(device=device, memory_format=fmt) for net in nets])
    if cfg.model.sync_bn and distributed_run:
        students = nn.SyncBatchNorm.convert_sync_batchnorm(students)
    students.set_compile(network_compile_mode(cfg, compile_mode))
    return students


def network_compile_mode(cfg: TrainConfig, mode: str) -> str:
    """The compile mode of each network alone: `mode` (compile.mode resolved) with compile.scope
    networks; "none" with scope step (the whole forward_loss is compiled instead)."""
    return mode if cfg.compile.scope == "networks" else "none"


def step_compile_mode(cfg: TrainConfig, mode: str) -> str:
    """The compile mode of TrainStep.forward_loss: `mode` with compile.scope step, else "none"."""
    return mode if cfg.compile.scope == "step" else "none"


def build_step(cfg: TrainConfig, num_classes: int, device: torch.device, *, teacher: nn.Module | None = None,
               lr: float | None = None, ddp: bool = False, nets: list[nn.Module] | None = None,
               live_teacher: bool = True) -> TrainStep:  # fmt: skip
    """The trainer's step from a config, without data: students from model.students, the given
    frozen `teacher` (moved to `device`, compiled per compile.mode; a randomly initialised
    model.teacher when the method needs one and none is given: what the benchmarks time),
    optimizer (at `lr`, default the peak lr of one rank: `fastkd.schedule.peak_lr`), gradient
    clipping, EMA, MixUp / CutMix, scaler and loss as `fastkd train` builds them. ddp=True wraps
    the students in DistributedDataParallel (a process group must exist). `nets`: the student
    networks to train instead of new model.students. live_teacher=False: no teacher at all (its
    logits come with each batch, from a teacher cache). compile.mode auto is resolved here
    (`fastkd.runtime.resolve_compile_mode`: CUDA graphs of the whole step on one CUDA device).
    On CUDA with model.fold_teacher_bn the teacher's BatchNorm is folded into its convolutions
    and its weights kept in the autocast dtype (`fastkd.frozen_teacher`)."""
    mode, _ = resolve_compile_mode(cfg.compile.mode, device, ddp)
    amp = resolve_amp_dtype(cfg.precision.amp, device)
    students = build_students(cfg, num_classes, device, ddp, nets, mode)
    if cfg.loss.uses_teacher and live_teacher:
        if teacher is None:
            teacher = build_model(cfg.model.teacher, num_classes, channels_last=cfg.precision.channels_last)
            teacher.eval().requires_grad_(False)
        if device.type == "cuda" and cfg.model.fold_teacher_bn:
            teacher = as_frozen_teacher(teacher, device, amp, cfg.precision.channels_last)
        teacher = compile_fn(teacher.to(device), network_compile_mode(cfg, mode))
    else:
        teacher = None
    model = students
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(students, device_ids=ids)
    optimizer = build_optimizer(students, cfg.optim, lr if lr is not None else peak_lr(cfg, 1)[0])
    ema = None
    if cfg.ema.decay is not None:
        ema = StudentsEMA(dict(zip(network_names(cfg.model.students), students.nets)), cfg.ema.decay, cfg.ema.every)
    return TrainStep(students, teacher, cfg.loss, optimizer, device, amp, model=model,
                     clip_grad_norm=cfg.optim.clip_grad_norm, ema=ema, augment=cfg.augment,
                     mix_seed=cfg.run.seed, compile_mode=step_compile_mode(cfg, mode),
                     num_classes=num_classes,
                     networks_compiled=network_compile_mode(cfg, mode) != "none")  # fmt: skip

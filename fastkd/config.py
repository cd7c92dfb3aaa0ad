"""The one typed training config: nested dataclasses, YAML file, then `--section.key value` flags.

    cfg = resolve_config("fastkd/configs/imagenet100_uadkd.yaml", {"optim.lr": "0.3"})
    cfg.optim.lr                    # 0.3 (absolute; the file's optim.lr_per_256 is dropped)
    save_config(cfg, run_dir / "config.yaml")

Order of layers: dataclass defaults -> (when resuming) the checkpoint's config -> the YAML file
-> command-line overrides (fastkd.config_cli parses them with tyro). Every layer is checked
against the dataclasses: an unknown key or a value of the wrong type raises FastKDError naming
`section.key`. Each field's trailing comment is its `--help` text (tyro reads it), so keep it to
one line.

The peak learning rate is `optim.lr` (absolute) or `optim.lr_per_256` (x global batch / 256;
both null: per 256 images, 0.5 for SGD and 2.5e-4 for AdamW, `fastkd.schedule.peak_lr`). One
layer (a file, the command line) may set only one of them; a layer that sets one drops the
other's value from the layers below, so `--lr 0.1` over a file with lr_per_256 just works.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from fastkd.data.spec import BackendName
from fastkd.errors import FastKDError
from fastkd.losses import PEER_METHODS, TEACHER_METHODS, LossConfig
from fastkd.recipe import AugmentConfig, EmaConfig, OptimConfig, lr_pair_layer, recipe_problems
from fastkd.runtime import AmpMode, CompileMode


@dataclass(kw_only=True)
class DataConfig:
    dir: str | None = None  # packed directory written by `fastkd pack`
    backend: BackendName = "ffcv"  # loader; auto: fastest here, printed
    batch_size: int = 256  # images per step per rank; optim.lr_per_256 scales with batch_size x ranks / 256
    num_workers: int | None = None  # loader workers; null = the backend's default
    decode: Literal["auto", "device", "host"] = "auto"  # torch backend: JPEGs decoded by nvJPEG on the GPU (device) or by the loader workers on host cores (host); auto: device on CUDA
    resolution: int = 160  # train resolution (px) when progressive resizing is off
    val_resolution: int = 224  # val resolution (px)
    min_resolution: int | None = None  # progressive resizing: first-epoch resolution (set with max)
    max_resolution: int | None = None  # progressive resizing: last-ramp-epoch resolution
    ramp_end_epoch: int | None = None  # epoch reaching max_resolution; null = the last epoch


@dataclass(kw_only=True)
class ModelConfig:
    teacher: str = "resnet50"  # teacher: torchvision name, else timm; timm:NAME / tv:NAME pick the zoo
    teacher_weights: str | None = None  # imagenet (local cache, never downloaded), timm:NAME.TAG, run dir, checkpoint, state_dict/.safetensors
    teacher_cache: str | None = None  # `fastkd teacher-cache` dir: cached logits, no teacher forward
    students: list[str] = field(default_factory=lambda: ["resnet18", "mobilenet_v2"])  # 1 or 2 archs, named as the teacher
    student_weights: list[str] = field(default_factory=list)  # initial weights NET=PATH (NET: resnet18, resnet18-2; PATH as teacher_weights)
    sync_bn: bool = False  # SyncBatchNorm in the students across ranks (CUDA only)
    fold_teacher_bn: bool = True  # on CUDA: the frozen teacher's BatchNorm folded into its convolutions, its weights in the autocast dtype


@dataclass(kw_only=True)
class ScheduleConfig:
    epochs: int = 16  # training epochs
    warmup_epochs: float = 1.0  # linear warm-up from 0 to the peak lr, per iteration
    shape: Literal["cosine", "linear"] = "cosine"  # decay to schedule.min_lr after warm-up
    min_lr: float = 0.0  # lr at the end of the decay (absolute, not scaled by the batch)


@dataclass(kw_only=True)
class PrecisionConfig:
    amp: AmpMode = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = True  # NHWC memory format for the networks and images


@dataclass(kw_only=True)
class CompileConfig:
    mode: CompileMode = "auto"  # torch.compile; auto: reduce-overhead (the whole step in CUDA graphs) on one CUDA device, none on CPU and under DDP; reduce-overhead and cudagraphs (no Triton) need CUDA
    scope: Literal["step", "networks"] = "step"  # step: teacher + students + loss as one graph (backward compiled with it); networks: each network alone
    warm: bool = True  # compile every train resolution before the first step (timed apart, logged as `compile` records)


@dataclass(kw_only=True)
class RunConfig:
    out: str = "runs/fastkd"  # run directory
    seed: int = 0  # seed of weights init, data order and augmentation
    log_every: int = 50  # steps between metric reads (the only host syncs of the loop)
    eval_every: int = 1  # epochs between val passes (the last epoch is always evaluated)
    resume: str | None = None  # `auto` (OUT/checkpoints/last.pt if present), a run dir or a checkpoint path
    device: str = "auto"  # auto (cuda if available), cpu, cuda (rank r: cuda:r), cuda:N (rank r: cuda:N+r)
    deterministic: bool = False  # deterministic kernels, no cudnn autotuning (exact resume)
    stop_after: int | None = None  # end this invocation after that many epochs (split a run)
    live: bool = True  # rich live progress display on rank 0
    summary: bool = True  # print the final results table on rank 0 (with or without run.live)
    overwrite: bool = False  # a fresh run may replace the run already in run.out
    log: list[str] = field(default_factory=lambda: ["tensorboard"])  # loggers beside metrics.jsonl: tensorboard, wandb, none


@dataclass(kw_only=True)
class DistConfig:
    gpus: int = 1  # ranks on this node: >1 relaunches under torch.distributed.run


@dataclass(kw_only=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def section_classes() -> dict[str, type]:
    """Section name -> its dataclass, in TrainConfig's order."""
    return {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


def _check(value: Any, tp: Any, key: str) -> Any:
    """`value` converted to `tp` (int -> float, comma string -> list) or FastKDError naming key."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _check(value, arg, key)
            except FastKDError:
                continue
    elif origin is Literal:
        if value in get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [_check(v, get_args(tp)[0], key) for v in value]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `5e-5` as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise FastKDError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")


def _merge(base: dict, update: dict, source: str) -> dict:
    """`update` (a partial nested dict) checked and laid over `base` (a full nested dict)."""
    if not isinstance(update, dict):
        raise FastKDError(f"{source}: expected a mapping of sections, got {type(update).__name__}")
    sections = section_classes()
    merged = {name: dict(values) for name, values in base.items()}
    for section, values in update.items():
        if section not in sections:
            raise FastKDError(f"{source}: unknown config section {section!r} (known: {', '.join(sections)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise FastKDError(f"{source}: section {section} must be a mapping, got {values!r}")
        hints = get_type_hints(sections[section])
        for key, value in values.items():
            if key not in hints:
                raise FastKDError(
                    f"{source}: unknown config key {section}.{key} (known: {', '.join(hints)})"
                )
            merged[section][key] = _check(value, hints[key], f"{section}.{key}")
        if section == "optim":
            lr_pair_layer(values, merged["optim"], source)
    return merged


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, source: str = "config", check: bool = True) -> TrainConfig:
    """A full TrainConfig from a (possibly partial) nested dict over the defaults, type-checked
    and (check=True) validated across keys."""
    merged = _merge(config_to_dict(TrainConfig()), data, source)
    sections = section_classes()
    cfg = TrainConfig(**{name: sections[name](**values) for name, values in merged.items()})
    if check:
        validate(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FastKDError(f"config file {path} not found") from None
    except (OSError, yaml.YAMLError) as error:
        raise FastKDError(f"config file {path}: {error}") from None
    return data or {}


def parse_overrides(overrides: dict[str, Any]) -> dict:
    """{"optim.lr": "0.3"} -> {"optim": {"lr": 0.3}}: the dotted form of the Python API, the
    benchmarks and fastkd.config_cli. A string for a field that is not a string is read as YAML
    (`null` means None); `str` fields keep the text as it is; values are checked by _merge."""
    sections = section_classes()
    nested: dict[str, dict] = {}
    for dotted, raw in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in sections or key not in get_type_hints(sections[section]):
            raise FastKDError(f"unknown config key {dotted}")
        tp = get_type_hints(sections[section])[key]
        value = raw
        if isinstance(raw, str):
            if raw in ("null", "None", "~") and accepts_none(tp):
                value = None
            elif not _accepts_str(tp):
                try:
                    value = yaml.safe_load(raw)
                except yaml.YAMLError:
                    value = raw
        nested.setdefault(section, {})[key] = value
    return nested


def _accepts_str(tp: Any) -> bool:
    if get_origin(tp) in (Union, types.UnionType):
        return any(_accepts_str(a) for a in get_args(tp))
    return tp is str or get_origin(tp) in (Literal, list)


def accepts_none(tp: Any) -> bool:
    """Whether a field of type `tp` may be None (null in YAML)."""
    return tp is type(None) or (get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp))


def resolve_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict | None = None,
    check: bool = True,
) -> TrainConfig:
    """defaults -> base (e.g. a checkpoint's config) -> YAML file -> overrides, type-checked;
    check=False skips the checks across keys (to read run.resume before the base is known)."""
    merged = config_to_dict(TrainConfig())
    if base:
        merged = _merge(merged, base, "checkpoint config")
    if path is not None:
        merged = _merge(merged, load_yaml(path), f"config file {path}")
    if overrides:
        merged = _merge(merged, parse_overrides(overrides), "command line")
    return config_from_dict(merged, check=check)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def validate(cfg: TrainConfig) -> None:
    """Checks across keys; each message names the key(s) to change. Keys a config file may leave
    to the command line (data.dir, model.teacher_weights) are checked by `check_runnable`."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise FastKDError(f"config: {message}")

    d, m, s, r = cfg.data, cfg.model, cfg.schedule, cfg.run
    need(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    need(d.resolution >= 8 and d.val_resolution >= 8, "data.resolution and data.val_resolution must be >= 8")
    need(d.decode == "auto" or d.backend == "torch",
         f"data.decode {d.decode} is an option of --backend torch, not {d.backend}")
    need((d.min_resolution is None) == (d.max_resolution is None),
         "data.min_resolution and data.max_resolution must be set together (progressive resizing)")
    if d.min_resolution is not None:
        need(8 <= d.min_resolution <= d.max_resolution, "need 8 <= data.min_resolution <= data.max_resolution")
    need(d.num_workers is None or d.num_workers >= 0, "data.num_workers must be >= 0 or null")
    need(1 <= len(m.students) <= 2, f"model.students must name 1 or 2 networks, got {m.students}")
    method = cfg.loss.method
    need(method not in PEER_METHODS or len(m.students) == 2,
         f"loss.method {method} has a student-student term: model.students needs 2 networks")
    need(cfg.loss.temperature > 0 and cfg.loss.entropy_temperature > 0, "loss temperatures must be > 0")
    need(0.0 <= cfg.loss.label_smoothing < 1.0, "loss.label_smoothing must be in [0, 1)")
    need(s.epochs >= 1, f"schedule.epochs must be >= 1, got {s.epochs}")
    need(0 <= s.warmup_epochs <= s.epochs, "schedule.warmup_epochs must be in [0, schedule.epochs]")
    need(s.min_lr >= 0, f"schedule.min_lr must be >= 0, got {s.min_lr}")
    for problem in recipe_problems(cfg):  # optim, augment and ema keys
        need(False, problem)
    need(r.log_every >= 1 and r.eval_every >= 1, "run.log_every and run.eval_every must be >= 1")
    need(r.device in ("auto", "cpu", "cuda") or r.device.startswith("cuda:"), "run.device: auto, cpu or cuda")
    need(r.stop_after is None or r.stop_after >= 1, "run.stop_after must be >= 1 or null")
    need(cfg.dist.gpus >= 1, "dist.gpus must be >= 1")


def check_runnable(cfg: TrainConfig, has_data: bool = False, has_teacher: bool = False) -> None:
    """What a training run needs beyond a valid config: data (unless loaders are given), and
    teacher weights (or a teacher cache, or a teacher module) when the method distils from one."""
    if not cfg.data.dir and not has_data:
        raise FastKDError("no data: pass --data PACKED_DIR (written by `fastkd pack`)")
    if cfg.loss.method in TEACHER_METHODS and not (cfg.model.teacher_weights or cfg.model.teacher_cache or has_teacher):
        raise FastKDError(
            f"loss.method {cfg.loss.method} distils from a teacher: pass --teacher-weights "
            "CHECKPOINT|RUN_DIR|WEIGHTS|imagenet or --teacher-cache DIR (or --method ce / dml, which need none)"
        )

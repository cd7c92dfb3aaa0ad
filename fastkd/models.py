"""Networks by name from torchvision or timm; teachers and students from files or cached weights.

    student = build_model("resnet18", num_classes=100)            # channels_last, random init
    student = build_model("timm:resnet10t", num_classes=100)      # timm, random init
    teacher = load_teacher("imagenet", "resnet50", manifest)      # 1000-way head sliced to 100
    teacher = load_teacher("runs/t/checkpoints/last.pt", "resnet50", manifest)
    teacher = load_teacher("runs/t", "resnet50", manifest)        # best-resnet50.pt, else last.pt
    paths = load_student_weights({"resnet18": net}, ["resnet18=r18.safetensors"], manifest)

Naming rule (teacher and students alike): a plain name is a torchvision classification model
when torchvision has it (`torchvision.models.list_models`), else a timm model (`timm.list_models`,
a pretrained tag like `resnet50.a1_in1k` allowed); `timm:NAME` always means timm's NAME and
`tv:NAME` / `torchvision:NAME` torchvision's. So `resnet50` is torchvision's, `timm:resnet50`
timm's, `resnet10t` timm's. An unknown name is a FastKDError listing the closest names of both
zoos. Every network gives [B, num_classes] logits (timm: `timm.create_model(name,
pretrained=False, num_classes=K)`). A run names its networks without the zoo prefix
(`network_names`: timm:resnet18 -> resnet18, a repeat -> resnet18-2).

Weights (`--teacher-weights`, `--student-weights NET=PATH`): `imagenet` (the architecture's
default pretrained weights), `timm:NAME.TAG` (timm's weights TAG of a timm architecture NAME),
both read only from the local caches (fastkd.weights), or a fastkd checkpoint / run folder /
state_dict / wrapped / `.safetensors` file (fastkd.checkpoint.load_file, fastkd.weights). A
1000-way ImageNet-1k head keeps the rows of the manifest classes' `imagenet_index` (in label
order): its logits equal the full model's logits[:, indices], a usable ImageNet-100 teacher
without fine-tuning. This module builds networks and fits state_dicts to them (with a message
naming the architecture a mismatched file looks like).
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from fastkd.checkpoint import _check_classes, load_file, resolve_weights_path, state_from_file
from fastkd.errors import FastKDError
from fastkd.weights import (
    AUX_LOGITS,
    align_keys,
    build_kwargs,
    cached_timm_file,
    cached_torchvision_file,
    head_rows,
    heads,
    load_weights,
    select_prefix,
    split_weights_spec,
)

_TV_PREFIXES = ("tv:", "torchvision:")
_TIMM_PREFIX = "timm:"
# torchvision's densenet files keep pre-1.0 keys ('norm.1'); its loader renames them the same way
_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")


# ---------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class Arch:
    """A resolved architecture name: zoo "torchvision" or "timm", and the zoo's own name."""

    zoo: str
    name: str

    @property
    def label(self) -> str:
        """How reports name it, e.g. torchvision:resnet18 or timm:resnet10t."""
        return f"{self.zoo}:{self.name}"


def _timm():
    import timm  # heavy (seconds): imported only when a name is not torchvision's

    return timm


def classifier_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


@functools.lru_cache(maxsize=1)
def timm_names() -> tuple[str, ...]:
    return tuple(_timm().list_models())


def _split_zoo(spec: str) -> tuple[str | None, str]:
    if spec.startswith(_TIMM_PREFIX):
        return "timm", spec[len(_TIMM_PREFIX) :]
    for prefix in _TV_PREFIXES:
        if spec.startswith(prefix):
            return "torchvision", spec[len(prefix) :]
    return None, spec


def resolve_arch(spec: str) -> Arch:
    """The architecture a user's name stands for (rule in the module docstring), or a
    FastKDError naming the closest names of both zoos."""
    zoo, name = _split_zoo(spec)
    if zoo in (None, "torchvision") and name in classifier_names():
        return Arch("torchvision", name)
    if zoo in (None, "timm") and name and _timm().is_model(name):
        base, _, tag = name.partition(".")
        if tag and f"{base}.{tag}" not in _timm().list_pretrained(f"{base}.*"):
            tags = ", ".join(t.partition(".")[2] for t in _timm().list_pretrained(f"{base}.*")) or "none"
            raise FastKDError(f"model {spec!r}: timm has no pretrained tag {tag!r} for {base} (its tags: {tags})")
        return Arch("timm", name)
    options = {n: n for n in classifier_names()} if zoo != "timm" else {}
    if zoo != "torchvision":  # plain where that resolves to timm, else timm:NAME
        for n in timm_names():
            options.setdefault(n, f"{_TIMM_PREFIX}{n}" if zoo or n in options else n)
    close = [options[n] for n in difflib.get_close_matches(name, list(options), n=6, cutoff=0.6)]
    where = {None: "neither a torchvision classifier nor a timm model", "timm": "not a timm model",
             "torchvision": "not a torchvision classifier"}[zoo]  # fmt: skip
    raise FastKDError(f"unknown model {spec!r}: {where}; closest: {', '.join(close) or '(none)'} (a plain name "
                      f"is torchvision's, else timm's; timm:NAME or tv:NAME picks one zoo)")  # fmt: skip


def arch_label(spec: str) -> str:
    """Report name of an architecture, e.g. "resnet18" -> "torchvision:resnet18"."""
    return resolve_arch(spec).label


def same_arch(a: str, b: str) -> bool:
    """Whether two names stand for the same architecture (timm pretrained tags ignored)."""
    try:
        x, y = resolve_arch(a), resolve_arch(b)
    except FastKDError:
        return a == b
    return x.zoo == y.zoo and x.name.split(".")[0] == y.name.split(".")[0]


def network_names(archs: list[str]) -> list[str]:
    """Run-wide network names: the architecture without zoo prefix, suffixed -2, -3 when repeated."""
    names, seen = [], {}
    for arch in archs:
        base = _split_zoo(arch)[1]
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


# ---------------------------------------------------------------------------------- building


def build_model(name: str, num_classes: int, channels_last: bool = True) -> nn.Module:
    """A randomly initialised torchvision or timm classifier with a `num_classes`-way head:
    forward([B, 3, H, W]) -> [B, num_classes] logits."""
    arch = resolve_arch(name)
    if arch.zoo == "timm":
        model = _timm().create_model(arch.name, pretrained=False, num_classes=num_classes)
    else:
        kwargs = build_kwargs(arch.name)
        model = torchvision.models.get_model(arch.name, weights=None, num_classes=num_classes, **kwargs)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pretrained_model(arch: Arch, weights: str = "imagenet") -> tuple[nn.Module, Path]:
    """(model with its zoo's pretrained weights, the cached file read), never downloading.

    weights: `imagenet` (the architecture's default weights) or `timm:NAME.TAG` (that timm
    weights tag of the same timm architecture). FastKDError when the file is not cached."""
    if weights != "imagenet":
        wanted = resolve_arch(weights)
        if wanted.zoo != "timm" or not same_arch(weights, arch.label):
            base = wanted.name.split(".")[0]
            raise FastKDError(f"weights {weights} are timm's {base}, the network is {arch.label}: give it "
                              f"the architecture {_TIMM_PREFIX}{base} (e.g. --teacher {_TIMM_PREFIX}{base})")
        arch = wanted
    if arch.zoo == "timm":
        timm = _timm()
        cfg = timm.models.get_pretrained_cfg(arch.name)
        cfg = cfg.to_dict() if cfg is not None else {}
        if not (cfg.get("hf_hub_id") or cfg.get("url")):
            raise FastKDError(f"timm has no pretrained weights for {arch.name}; pass a weights file")
        if cfg.get("num_classes") != 1000:
            raise FastKDError(f"timm weights {arch.name} have a {cfg.get('num_classes')}-way head, not ImageNet-1k's "
                              "1000 classes: pick an ImageNet-1k tag (timm:NAME.TAG) or pass a weights file")
        path = cached_timm_file(arch.name, cfg)
        state = load_file(path)  # weights_only / safetensors; timm's filter_fn still adapts it
        model = timm.create_model(arch.name, pretrained=True, pretrained_cfg_overlay={"state_dict": state})
        return model, path
    enum = torchvision.models.get_model_weights(arch.name).DEFAULT
    path = cached_torchvision_file(arch.name, enum.url)
    state = {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in load_file(path).items()}
    kwargs = {"num_classes": len(enum.meta["categories"])}
    if arch.name in AUX_LOGITS:  # what torchvision's builders do for their weights
        kwargs.update(aux_logits=True, transform_input=True, init_weights=False)
    if arch.name.startswith("vit_"):
        kwargs["image_size"] = enum.meta["min_size"][0]
    model = torchvision.models.get_model(arch.name, weights=None, **kwargs)
    load_weights(model, state, path, arch.name)
    if arch.name in AUX_LOGITS:
        model.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    return model, path


# ---------------------------------------------------------------------------------- heads


def slice_head(model: nn.Module, indices: list[int]) -> nn.Module:
    """Keep only rows `indices` of the classifier head(s) (in that order), in place."""
    for name, head in heads(model):
        rows = torch.as_tensor(indices, dtype=torch.long, device=head.weight.device)
        if isinstance(head, nn.Linear):
            new = nn.Linear(head.in_features, len(indices), bias=head.bias is not None)
        else:
            new = nn.Conv2d(head.in_channels, len(indices), kernel_size=1, bias=head.bias is not None)
        new = new.to(device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(head.weight[rows])
            if head.bias is not None:
                new.bias.copy_(head.bias[rows])
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
        if hasattr(model, "num_classes"):  # timm keeps it for reset_classifier / reports
            model.num_classes = len(indices)
    return model


def imagenet_indices(manifest: dict, source: str = "imagenet") -> list[int]:
    """ImageNet-1k head rows of the manifest's classes, in label order.

    source: what the 1000-way head came from (`imagenet`, or the weights file the user gave),
    for the message when a class has no ImageNet-1k index."""
    indices = []
    classes = sorted(manifest["classes"], key=lambda c: c["label"])
    for cls in classes:
        if cls.get("imagenet_index") is None and source != "imagenet":
            raise FastKDError(
                f"{source} has a 1000-way ImageNet-1k head and the data {len(classes)} classes, so only the "
                f"head rows of the data's classes would be kept, but class {cls.get('wnid')!r} ({cls.get('name')}) "
                f"has no ImageNet-1k index; give weights trained on these {len(classes)} classes"
            )
        if cls.get("imagenet_index") is None:
            raise FastKDError(
                f"class {cls.get('wnid')!r} ({cls.get('name')}) has no ImageNet-1k index: teacher "
                "weights `imagenet` need ImageNet classes; pass a fastkd checkpoint or state_dict"
            )
        indices.append(int(cls["imagenet_index"]))
    return indices


# ---------------------------------------------------------------------------------- fitting


def _bare(model: nn.Module) -> nn.Module:
    """The network inside torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _is_pretrained_spec(spec: str) -> bool:
    return spec == "imagenet" or spec.startswith(_TIMM_PREFIX) and not Path(spec).exists()


def fit_weights(model: nn.Module, spec: str, arch: str, manifest: dict, network: str | None = None) -> Path:
    """Load weights `spec` (see load_teacher) into `model` (architecture `arch`, a
    len(manifest classes)-way head; device and memory format kept), a 1000-way ImageNet-1k
    head sliced to the manifest's classes. network: the run's name for it (run folders'
    best-<network>.pt, fastkd checkpoints' network of that name). Returns the file read."""
    network = network or network_names([arch])[0]
    model = _bare(model)
    if _is_pretrained_spec(spec):
        source, path = pretrained_model(resolve_arch(arch), spec)
        slice_head(source, imagenet_indices(manifest, source=spec))  # messages name `imagenet` or timm:NAME
        state = source.state_dict()
        if hasattr(source, "transform_input"):  # torchvision's googlenet/inception weights expect it
            model.transform_input = source.transform_input
    else:
        spec, prefix = split_weights_spec(spec)  # PATH:PREFIX picks one network of a wrapper file
        path = resolve_weights_path(spec, network)
        obj = load_file(path)
        _check_classes(obj, path, manifest)
        state = state_from_file(obj, path, arch, network=network, same_arch=lambda a: same_arch(a, arch))
        if prefix is not None:
            state = select_prefix(state, prefix, path)
        state = align_keys(state, list(model.state_dict()), path)
        if len(manifest["classes"]) != 1000 and head_rows(model, state) == 1000:
            rows = torch.as_tensor(imagenet_indices(manifest, source=str(path)))
            prefixes = tuple(f"{name}." for name, _ in heads(model))
            state = {k: v[rows] if k.startswith(prefixes) and v.ndim >= 1 and v.shape[0] == 1000 else v
                     for k, v in state.items()}  # fmt: skip
    load_weights(model, state, path, arch)
    return Path(path)


def load_teacher(spec: str, name: str, manifest: dict, channels_last: bool = True) -> nn.Module:
    """Frozen teacher `name` (eval mode, no grads) with one logit per manifest class.

    spec: `imagenet` (the zoo's default ImageNet weights, from the local cache only; head
    sliced), `timm:NAME.TAG` (timm weights TAG, likewise), a fastkd checkpoint, a state_dict
    file (plain, wrapped, prefixed or .safetensors; a 1000-way ImageNet one is sliced like
    `imagenet`), or a run folder (checkpoints/best-<net>.pt, else checkpoints/last.pt). A file
    whose classes are known (a fastkd checkpoint, or best-<net>.pt beside a last.pt) must have
    the manifest's classes.
    """
    if _is_pretrained_spec(spec):
        indices = imagenet_indices(manifest)  # before any file lookup: the data's classes decide first
        model = slice_head(pretrained_model(resolve_arch(name), spec)[0], indices)
    else:
        model = build_model(name, len(manifest["classes"]), channels_last=False)
        fit_weights(model, spec, name, manifest)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval().requires_grad_(False)
    return model


def load_student_weights(students: dict[str, nn.Module], specs: list[str], manifest: dict) -> dict[str, str]:
    """Initial weights for the students: each spec `NET=PATH` (NET a run network name, e.g.
    resnet18 or resnet18-2; PATH as load_teacher's spec) loaded in place into students[NET].
    Returns NET -> the file read. FastKDError for a malformed spec, an unknown or repeated NET
    (naming the valid ones) or a file that does not fit."""
    chosen: dict[str, str] = {}
    for spec in specs:
        net, sep, path = str(spec).partition("=")
        net, path = net.strip(), path.strip()
        if not sep or not net or not path:
            raise FastKDError(f"--student-weights {spec!r}: expected NET=PATH with NET one of {', '.join(students)}")
        if net not in students:
            close = difflib.get_close_matches(net, list(students), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise FastKDError(f"--student-weights {spec!r}: this run has no student {net!r}{hint}; its students: "
                              f"{', '.join(students)}")  # fmt: skip
        if net in chosen:
            raise FastKDError(f"--student-weights names student {net} twice ({chosen[net]!r} and {path!r})")
        chosen[net] = path
    loaded = {}
    for net, path in chosen.items():
        model = _bare(students[net])
        cfg = getattr(model, "pretrained_cfg", None)  # timm models carry their architecture name
        arch = f"{_TIMM_PREFIX}{cfg['architecture']}" if cfg else re.sub(r"-\d+$", "", net)
        loaded[net] = str(fit_weights(model, path, arch, manifest, network=net))
    return loaded

"""Networks by torchvision name, and teachers from checkpoints, state_dicts or ImageNet weights.

    student = build_model("resnet18", num_classes=100)            # channels_last, random init
    teacher = load_teacher("imagenet", "resnet50", manifest)      # 1000-way head sliced to 100
    teacher = load_teacher("runs/t/checkpoints/last.pt", "resnet50", manifest)
    teacher = load_teacher("runs/t", "resnet50", manifest)        # best-resnet50.pt, else last.pt

A teacher from `imagenet` keeps the head rows of the manifest classes' `imagenet_index` (in
label order): its logits equal the full model's logits[:, indices], a usable ImageNet-100
teacher without fine-tuning.

Reading and validating files is fastkd.checkpoint's job; this module builds networks and fits
state_dicts to them (with a message naming the architecture a mismatched file looks like).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from fastkd.checkpoint import _check_classes, load_file, resolve_weights_path, state_from_file
from fastkd.errors import FastKDError

_AUX_LOGITS = ("googlenet", "inception_v3")  # aux heads off: one logits tensor per forward


def classifier_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def build_model(name: str, num_classes: int, channels_last: bool = True) -> nn.Module:
    """A randomly initialised torchvision classifier with a `num_classes`-way head."""
    if name not in classifier_names():
        raise FastKDError(
            f"unknown model {name!r}; torchvision classifiers: {', '.join(classifier_names())}"
        )
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_build_kwargs(name))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _build_kwargs(name: str) -> dict:
    return {"aux_logits": False, "init_weights": True} if name in _AUX_LOGITS else {}


def network_names(archs: list[str]) -> list[str]:
    """Run-wide network names: the architecture, suffixed -2, -3 when repeated."""
    names, seen = [], {}
    for arch in archs:
        seen[arch] = seen.get(arch, 0) + 1
        names.append(arch if seen[arch] == 1 else f"{arch}-{seen[arch]}")
    return names


def _head(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) of the last Linear (or 1x1 Conv2d, squeezenet) layer."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name:
            found = (name, module)
    if found is None or not isinstance(found[1], nn.Linear) and found[1].kernel_size != (1, 1):
        raise FastKDError(f"cannot find the classifier head of {type(model).__name__}")
    name, module = found
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr, module


def slice_head(model: nn.Module, indices: list[int]) -> nn.Module:
    """Keep only rows `indices` of the classifier head (in that order), in place."""
    parent, attr, head = _head(model)
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
    setattr(parent, attr, new)
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


def load_weights(model: nn.Module, state: dict, path: str | Path, arch: str) -> None:
    """model.load_state_dict(state), or a FastKDError that says why `state` (from `path`) does
    not fit `arch`: the class count, or which architecture its keys look like plus a few of
    the missing / unexpected / reshaped keys (never the full key dump)."""
    try:
        model.load_state_dict(state)  # torch's rules (e.g. BN's num_batches_tracked may be absent)
        return
    except RuntimeError as error:
        torch_error = error  # its text lists every key: replaced by the summary below
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    reshaped = [k for k in ours if k in theirs and ours[k] != theirs[k]]
    if missing or unexpected or reshaped:
        head = _head_name(model)
        if not missing and not unexpected and all(k.startswith(f"{head}.") for k in reshaped):
            rows = theirs[reshaped[0]][0]
            raise FastKDError(f"checkpoint {path}: its {arch} head has {rows} outputs, the data "
                              f"{ours[reshaped[0]][0]} classes; give weights trained on these classes")
        parts = [f"checkpoint {path} does not fit {arch}: {_looks_like(theirs, arch)}"]
        if missing:
            parts.append(f"{len(missing)} of {arch}'s {len(ours)} keys missing ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} of the file's {len(theirs)} keys unexpected ({_first(unexpected)})")
        if reshaped:
            shown = ", ".join(f"{k} {list(theirs[k])} vs {list(ours[k])}" for k in reshaped[:3])
            parts.append(f"{len(reshaped)} keys with other shapes ({shown}{', ...' if len(reshaped) > 3 else ''})")
        raise FastKDError("; ".join(parts))
    first = str(torch_error).strip().splitlines()[0][:300]
    raise FastKDError(f"checkpoint {path} does not fit {arch}: {first}")


def _first(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "")


# Common classifiers compared first when guessing what a state_dict is; the family of the best
# match (same leading letters: resnet, efficientnet, ...) is searched next.
_COMMON = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2",
           "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s",
           "convnext_tiny", "densenet121", "vgg16", "vgg16_bn", "vit_b_16", "swin_t", "squeezenet1_0",
           "squeezenet1_1", "shufflenet_v2_x1_0", "mnasnet1_0", "googlenet", "alexnet")


@functools.lru_cache(maxsize=None)
def _key_shapes(name: str) -> tuple[dict[str, tuple[int, ...]], str] | None:
    """(key -> shape, head module name) of torchvision's `name`, built on the meta device (no
    memory, no init cost); None where that fails (regnet's init copies data)."""
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None, **_build_kwargs(name))
    except Exception:  # noqa: BLE001 - an architecture that cannot be built on meta is just not compared
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, _head_name(model)


def _similarity(theirs: dict[str, tuple[int, ...]], name: str) -> float:
    """Share of keys (of both sets together) present in both with the same shape; head
    shapes are compared without their row count (the number of classes)."""
    ref = _key_shapes(name)
    if ref is None:
        return 0.0
    shapes, head = ref
    same = 0
    for key, shape in shapes.items():
        other = theirs.get(key)
        if other is not None and (other == shape or key.startswith(f"{head}.") and other[1:] == shape[1:]):
            same += 1
    return same / len(shapes.keys() | theirs.keys())


def guess_architecture(theirs: dict[str, tuple[int, ...]]) -> tuple[str, float]:
    """(torchvision architecture, similarity in [0, 1]) closest to a state_dict's key -> shape map."""
    scores = {name: _similarity(theirs, name) for name in _COMMON}
    best = max(scores, key=scores.get)
    family = re.match(r"[a-z]+", best).group()
    if scores[best] < 1.0:
        for name in classifier_names():
            if name not in scores and re.match(r"[a-z]+", name).group() == family:
                scores[name] = _similarity(theirs, name)
        best = max(scores, key=scores.get)
    return best, scores[best]


def _looks_like(theirs: dict[str, tuple[int, ...]], arch: str) -> str:
    name, score = guess_architecture(theirs)
    if score == 1.0 and name != arch:
        return f"its keys and shapes are those of torchvision's {name}, not {arch}"
    if score >= 0.5 and name != arch:
        return f"closest torchvision architecture: {name} ({100 * score:.0f}% of keys and shapes match)"
    return f"its keys match no common torchvision classifier (closest: {name}, {100 * score:.0f}%)"


def load_teacher(spec: str, name: str, manifest: dict, channels_last: bool = True) -> nn.Module:
    """Frozen teacher `name` (eval mode, no grads) with one logit per manifest class.

    spec: `imagenet` (torchvision's default 1000-class weights, from the torch cache or
    downloaded; head sliced), a fastkd checkpoint, a state_dict file (a 1000-way ImageNet
    state_dict is sliced like `imagenet`), or a run folder (checkpoint.resolve_weights_path:
    checkpoints/best-<name>.pt, else checkpoints/last.pt). A file whose classes are known (a
    fastkd checkpoint, or best-<net>.pt beside a last.pt) must have the manifest's classes.
    """
    num_classes = len(manifest["classes"])
    if spec == "imagenet":
        indices = imagenet_indices(manifest)
        try:
            model = torchvision.models.get_model(name, weights="DEFAULT")
        except Exception as error:  # no weights for this arch, or no network and no cache
            raise FastKDError(f"cannot load torchvision ImageNet weights of {name}: {error}") from None
        slice_head(model, indices)
    else:
        path = resolve_weights_path(spec, name)
        obj = load_file(path)
        _check_classes(obj, path, manifest)
        state = state_from_file(obj, path, name)
        model = build_model(name, num_classes, channels_last=False)
        if num_classes != 1000 and _head_rows(model, state) == 1000:
            indices = imagenet_indices(manifest, source=str(path))
            model = build_model(name, 1000, channels_last=False)
            load_weights(model, state, path, name)
            slice_head(model, indices)
        else:
            load_weights(model, state, path, name)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval().requires_grad_(False)
    return model


def _head_name(model: nn.Module) -> str:
    """Module name of the classifier head, e.g. `fc` or `classifier.1`."""
    head = _head(model)[2]
    return next(n for n, m in model.named_modules() if m is head)


def _head_rows(model: nn.Module, state: dict) -> int | None:
    """Output rows of the head weight in `state` (matched by the model's head name)."""
    weight = state.get(f"{_head_name(model)}.weight")
    return None if weight is None else int(weight.shape[0])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

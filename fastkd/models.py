"""Networks by torchvision name, and teachers from checkpoints, state_dicts or ImageNet weights.

    student = build_model("resnet18", num_classes=100)            # channels_last, random init
    teacher = load_teacher("imagenet", "resnet50", manifest)      # 1000-way head sliced to 100
    teacher = load_teacher("runs/t/checkpoints/last.pt", "resnet50", manifest)

A teacher from `imagenet` keeps the head rows of the manifest classes' `imagenet_index` (in
label order): its logits equal the full model's logits[:, indices], a usable ImageNet-100
teacher without fine-tuning.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from fastkd.errors import FastKDError

CHECKPOINT_FORMAT = "fastkd-checkpoint"
_AUX_LOGITS = ("googlenet", "inception_v3")  # aux heads off: one logits tensor per forward


def classifier_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def build_model(name: str, num_classes: int, channels_last: bool = True) -> nn.Module:
    """A randomly initialised torchvision classifier with a `num_classes`-way head."""
    if name not in classifier_names():
        raise FastKDError(
            f"unknown model {name!r}; torchvision classifiers: {', '.join(classifier_names())}"
        )
    kwargs = {"aux_logits": False, "init_weights": True} if name in _AUX_LOGITS else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


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


def imagenet_indices(manifest: dict) -> list[int]:
    """ImageNet-1k head rows of the manifest's classes, in label order."""
    indices = []
    for cls in sorted(manifest["classes"], key=lambda c: c["label"]):
        if cls.get("imagenet_index") is None:
            raise FastKDError(
                f"class {cls.get('wnid')!r} ({cls.get('name')}) has no ImageNet-1k index: teacher "
                "weights `imagenet` need ImageNet classes; pass a fastkd checkpoint or state_dict"
            )
        indices.append(int(cls["imagenet_index"]))
    return indices


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_file(path: str | Path) -> dict:
    """torch.load of a fastkd checkpoint or a state_dict (tensors only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FastKDError(f"checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file
        raise FastKDError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(obj, dict):
        raise FastKDError(f"checkpoint {path}: expected a dict, got {type(obj).__name__}")
    return obj


def state_from_file(obj: dict, path: str | Path, arch: str) -> dict:
    """The state_dict of network `arch` in a loaded file: a fastkd checkpoint holding that
    architecture (exactly one network of it) or a plain state_dict."""
    if obj.get("format") == CHECKPOINT_FORMAT:
        matches = [name for name, a in obj["archs"].items() if a == arch]
        if len(matches) != 1:
            raise FastKDError(
                f"checkpoint {path} holds {dict(obj['archs'])}: need exactly one {arch} network"
            )
        return _strip_prefixes(obj["models"][matches[0]])
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FastKDError(f"checkpoint {path} is neither a fastkd checkpoint nor a state_dict")
    return _strip_prefixes(obj)


def _load_state(model: nn.Module, state: dict, path: str | Path, arch: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[:3]
        raise FastKDError(f"checkpoint {path} does not fit {arch}: {' '.join(first)}") from None


def load_teacher(spec: str, name: str, manifest: dict, channels_last: bool = True) -> nn.Module:
    """Frozen teacher `name` (eval mode, no grads) with one logit per manifest class.

    spec: `imagenet` (torchvision's default 1000-class weights, from the torch cache or
    downloaded; head sliced), a fastkd checkpoint, or a state_dict file (a 1000-way ImageNet
    state_dict is sliced like `imagenet`).
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
        obj = load_file(spec)
        _check_classes(obj, spec, manifest)
        state = state_from_file(obj, spec, name)
        model = build_model(name, num_classes, channels_last=False)
        if num_classes != 1000 and _head_rows(model, state) == 1000:
            model = build_model(name, 1000, channels_last=False)
            _load_state(model, state, spec, name)
            slice_head(model, imagenet_indices(manifest))
        else:
            _load_state(model, state, spec, name)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval().requires_grad_(False)
    return model


def _check_classes(obj: dict, path: str | Path, manifest: dict) -> None:
    """A fastkd checkpoint's classes (WNIDs in label order) must be the manifest's."""
    if obj.get("format") != CHECKPOINT_FORMAT or "classes" not in obj:
        return
    theirs = [c["wnid"] for c in sorted(obj["classes"], key=lambda c: c["label"])]
    ours = [c["wnid"] for c in sorted(manifest["classes"], key=lambda c: c["label"])]
    if theirs != ours:
        diff = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise FastKDError(
            f"checkpoint {path} was trained on other classes: {len(theirs)} classes vs {len(ours)} in the "
            f"data, first difference at label {diff}"
        )


def _head_rows(model: nn.Module, state: dict) -> int | None:
    """Output rows of the head weight in `state` (matched by the model's head name)."""
    head_name = next(n for n, m in model.named_modules() if m is _head(model)[2])
    weight = state.get(f"{head_name}.weight")
    return None if weight is None else int(weight.shape[0])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

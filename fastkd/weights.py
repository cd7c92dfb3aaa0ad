"""Weights into networks: other tools' files as one state_dict, fitting it (with a message that
says why it does not fit), classifier heads, and pretrained weights from the local caches only.

Reading bytes (torch.load with weights_only=True, or safetensors) is fastkd.checkpoint.load_file;
this module turns what a foreign file holds into the state_dict of one network:

- Wrappers, followed (up to 4 deep) until a dict of tensors is reached; EMA weights first, as
  timm's own loader does:  state_dict_ema, model_ema, ema, state_dict, model_state_dict, model,
  module.  So a timm train checkpoint ({"state_dict", "state_dict_ema", "args", "epoch"}), a
  Lightning one ({"state_dict": {"model.conv1.weight": ...}, "pytorch-lightning_version"}),
  torchdistill's ({"model": state_dict}) and EMA wrappers all give their weights.
- Prefixes: DDP's `module.` and torch.compile's `_orig_mod.` are always dropped
  (`strip_prefixes`); any other leading prefix (Lightning's `model.`, a KD wrapper's
  `student.`) is dropped by `align_keys` when the network's own keys appear under it. When
  several prefixes each hold the whole network, the user chooses one: `PATH:PREFIX`
  (`split_weights_spec`, `select_prefix`), e.g. `kd.ckpt:teacher`.

Fitting a state_dict to a network (`load_weights`) says, when it does not fit, why: the class
count, or which torchvision architecture the file looks like and a few of the missing /
unexpected / reshaped keys. `heads` finds a network's classifier (timm's
pretrained_cfg['classifier'], else the last Linear / 1x1 Conv2d).

Pretrained ImageNet weights are only ever read from the caches the zoos themselves fill:
torchvision's from the torch hub cache ($TORCH_HOME/hub/checkpoints, `torch.hub.get_dir()`),
timm's from the Hugging Face hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub; then timm's old torch hub location). fastkd never downloads at run
time: a missing file is a FastKDError saying where it looked and how to fetch it beforehand.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from fastkd.errors import FastKDError

EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# preferred when several prefixes hold the network's keys equally well (a KD wrapper's teacher too)
_KNOWN_PREFIXES = ("model.", "student.", "net.", "module.", "backbone.")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub loader reads, in its order


def is_state_dict(obj) -> bool:
    """A non-empty dict whose values are all tensors."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefixes(state: dict) -> dict:
    """Keys without DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def unwrap_state_dict(obj: dict, path: str | Path) -> tuple[dict, str]:
    """(state_dict, where) held by a loaded non-fastkd file; `where` names the wrapper keys
    followed, e.g. "state_dict_ema" or "model.state_dict" ("" for a plain state_dict).

    FastKDError naming `path` and its top-level keys when no dict of tensors is found."""
    found, where = obj, []
    for _ in range(4):
        if is_state_dict(found):
            return strip_prefixes(found), ".".join(where)
        key = next((k for k in EMA_KEYS + WRAPPER_KEYS if isinstance(found.get(k), dict) and found[k]), None)
        if key is None:
            break
        where.append(key)
        found = found[key]
    keys = ", ".join(map(str, list(obj)[:8])) + (", ..." if len(obj) > 8 else "")
    raise FastKDError(f"checkpoint {path} is neither a fastkd checkpoint nor a state_dict (keys: {keys}); "
                      f"state_dicts are also read under {', '.join(EMA_KEYS + WRAPPER_KEYS)}")  # fmt: skip


def align_keys(state: dict, expected: list[str], path: str | Path = "the weights") -> dict:
    """`state` as it is when it holds every key of `expected` (a network's state_dict keys),
    else the entries under the leading prefix (e.g. `model.`) that holds more of them than the
    bare keys do, with the prefix dropped; `state` unchanged when no prefix does better.

    Ties go to the usual prefixes (model., student., net., module., backbone.), then to the
    shortest prefix. When several prefixes each hold the whole network (a KD wrapper's trained
    `teacher.` beside its `student.`), no tie-break can know which one the user means: a
    FastKDError naming `path`, listing them and the `PATH:PREFIX` way to choose."""
    wanted = set(expected)
    bare = len(wanted & state.keys())
    if bare == len(wanted):
        return state
    found: dict[str, set[str]] = {}
    for key in state:
        for i, char in enumerate(key):
            if char == "." and key[i + 1 :] in wanted:
                found.setdefault(key[: i + 1], set()).add(key[i + 1 :])
    if not found:
        return state
    # BN's num_batches_tracked may be absent from a file (torch's loader allows it)
    required = {k for k in wanted if not k.endswith("num_batches_tracked")}
    full = sorted(p for p, keys in found.items() if required <= keys)
    if len(full) > 1:
        listed = ", ".join(p.rstrip(".") for p in full)
        raise FastKDError(f"checkpoint {path} holds a whole network under each of {len(full)} prefixes ({listed}); "
                          f"choose one as PATH:PREFIX, e.g. {path}:{full[0].rstrip('.')}")  # fmt: skip
    best = max(found, key=lambda p: (len(found[p]), p in _KNOWN_PREFIXES, -len(p)))
    if len(found[best]) <= bare:
        return state
    return {k[len(best) :]: v for k, v in state.items() if k.startswith(best)}


def split_weights_spec(spec: str) -> tuple[str, str | None]:
    """(path, prefix or None) of a weights spec: `ckpt.ckpt:teacher` -> ("ckpt.ckpt", "teacher.")
    when ckpt.ckpt exists and `ckpt.ckpt:teacher` does not; any other spec (a path, imagenet,
    timm:NAME.TAG) -> (spec, None)."""
    if ":" not in spec or os.path.exists(spec):
        return spec, None
    path, _, prefix = spec.rpartition(":")
    if not path or not os.path.exists(path) or not re.fullmatch(r"[\w.]+", prefix):
        return spec, None
    return path, prefix.rstrip(".") + "."


def select_prefix(state: dict, prefix: str, path: str | Path) -> dict:
    """The entries of `state` under `prefix` (e.g. "teacher."), the prefix dropped; FastKDError
    naming `path` and the prefixes it does hold when none is under it."""
    chosen = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not chosen:
        held = sorted({k.split(".", 1)[0] for k in state if "." in k})
        raise FastKDError(f"checkpoint {path} has no keys under {prefix.rstrip('.')!r}; its leading prefixes: "
                          f"{', '.join(held[:10]) or 'none'}")  # fmt: skip
    return chosen


# ---------------------------------------------------------------------------------- torchvision builds


AUX_LOGITS = ("googlenet", "inception_v3")  # torchvision nets built with aux heads off: one logits tensor


def build_kwargs(name: str) -> dict:
    """torchvision.models.get_model kwargs fastkd builds `name` with (aux heads off)."""
    return {"aux_logits": False, "init_weights": True} if name in AUX_LOGITS else {}


# ---------------------------------------------------------------------------------- heads


def heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the classifier head(s): timm's pretrained_cfg['classifier'] (two for
    distilled models) when it names Linear layers, else the last Linear (or 1x1 Conv2d,
    squeezenet) layer."""
    named = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if named:
        names = [named] if isinstance(named, str) else list(named)
        modules = dict(model.named_modules())
        if all(isinstance(modules.get(n), nn.Linear) for n in names):
            return [(n, modules[n]) for n in names]
    found = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name:
            found = (name, module)
    if found is None or not isinstance(found[1], nn.Linear) and found[1].kernel_size != (1, 1):
        raise FastKDError(f"cannot find the classifier head of {type(model).__name__}")
    return [found]


def head_name(model: nn.Module) -> str:
    """Module name of the classifier head, e.g. `fc`, `classifier.1` or `head.fc`."""
    return heads(model)[0][0]


def head_rows(model: nn.Module, state: dict) -> int | None:
    """Output rows of the head weight in `state` (matched by the model's head name)."""
    weight = state.get(f"{head_name(model)}.weight")
    return None if weight is None else int(weight.shape[0])


# ---------------------------------------------------------------------------------- fitting


def load_weights(model: nn.Module, state: dict, path: str | Path, arch: str) -> None:
    """model.load_state_dict(state) (keys under a wrapper prefix found by align_keys),
    or a FastKDError that says why `state` (from `path`) does not fit `arch`: the class count,
    or which architecture its keys look like plus a few of the missing / unexpected / reshaped
    keys (never the full key dump)."""
    state = align_keys(state, list(model.state_dict()), path)
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
        prefixes = tuple(f"{name}." for name, _ in heads(model))
        if not missing and not unexpected and all(k.startswith(prefixes) for k in reshaped):
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
            model = torchvision.models.get_model(name, weights=None, **build_kwargs(name))
    except Exception:  # noqa: BLE001 - an architecture that cannot be built on meta is just not compared
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, head_name(model)


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
        for name in torchvision.models.list_models(module=torchvision.models):
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


# ---------------------------------------------------------------------------------- caches


def torch_hub_file(url: str) -> Path:
    """Where torch.hub.load_state_dict_from_url keeps `url`: <hub dir>/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, from the environment at call time (huggingface_hub
    reads it once at import: tests and users may set it later)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface" / "hub"


def cached_torchvision_file(name: str, url: str) -> Path:
    """The torch hub cache file of torchvision's default weights of `name` (at `url`), or a
    FastKDError saying where it looked."""
    path = torch_hub_file(url)
    if path.is_file():
        return path
    raise FastKDError(
        f"torchvision ImageNet weights of {name} are not in the torch hub cache (looked for {path}; "
        "$TORCH_HOME moves it); fastkd does not download at run time: fetch them once with "
        f"`python -c \"import torchvision; torchvision.models.get_model('{name}', weights='DEFAULT')\"`, "
        "or pass a weights file"
    )


def cached_timm_file(model_name: str, cfg: dict) -> Path:
    """The cached file of timm's pretrained weights `model_name` (pretrained cfg `cfg`, as
    timm.models.get_pretrained_cfg(...).to_dict()): Hugging Face hub cache first, then timm's old
    torch hub location; else a FastKDError saying where it looked."""
    looked = []
    repo = cfg.get("hf_hub_id")
    if repo:
        repo, _, revision = repo.partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else list(_HF_FILES)
        if names[0].endswith(".bin"):
            names.insert(0, names[0][: -len(".bin")] + ".safetensors")
        cache = hf_hub_cache()
        for name in names:
            found = _hf_cached(repo, name, cache, revision or None)
            if found is not None:
                return found
        looked.append(f"{cache} ({repo}: {', '.join(names)})")
    url = cfg.get("url")
    if url and url.endswith((".pth", ".pt", ".bin", ".safetensors")):
        path = torch_hub_file(url)
        if path.is_file():
            return path
        looked.append(str(path))
    if not looked:
        raise FastKDError(f"timm has no downloadable weights for {model_name}; pass a weights file")
    raise FastKDError(
        f"timm weights {model_name} are not in the local caches (looked in {' and '.join(looked)}; $HF_HOME and "
        "$TORCH_HOME move them); fastkd does not download at run time: fetch them once with "
        f"`python -c \"import timm; timm.create_model('{model_name}', pretrained=True)\"`, or pass a weights file"
    )


def _hf_cached(repo: str, filename: str, cache: Path, revision: str | None) -> Path | None:
    """huggingface_hub's cache lookup (no network): the snapshot file, or None."""
    from huggingface_hub import try_to_load_from_cache  # optional: only timm weights need it

    found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None

"""Evaluate a checkpoint on the val split of a packed directory: top-1/top-5, loss, ECE per network.

    fastkd eval runs/uadkd/checkpoints/last.pt --data data/imagenet100-packed      # every student
    fastkd eval runs/uadkd --data data/imagenet100-packed                          # same (run dir)
    fastkd eval runs/uadkd --arch resnet18 --data DIR                              # its best-resnet18.pt
    fastkd eval runs/uadkd/checkpoints/best-resnet18.pt --data DIR                 # arch from the name
    fastkd eval weights.pt --arch resnet50 --data DIR                              # any state_dict

Resolution, backend and batch size default to the run's config (inside last.pt, or the run's
config.yaml next to checkpoints/best-<net>.pt), else to 224 / ffcv / 256. A 1000-way ImageNet
state_dict is sliced to the manifest's classes like a teacher. A checkpoint whose classes are
recorded (last.pt, or best-<net>.pt beside one) is refused on data with other classes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from fastkd.data.spec import AUTO, BACKENDS, val_pipeline
from fastkd.errors import FastKDError
from fastkd.notes import say, show
from fastkd.run_layout import BEST_PREFIX, RunLayout
from fastkd.runtime import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="last.pt, best-<net>.pt, a state_dict file or a run directory")
    parser.add_argument("--data", required=True, help="packed directory (val split)")
    parser.add_argument("--backend", default=None, choices=[*BACKENDS, AUTO])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None, help="val resolution (px)")
    parser.add_argument(
        "--arch", default=None, help="architecture of a plain state_dict; with a run directory, its best-<arch>.pt"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--num-workers", type=int, default=None)


def load_networks(path: Path, arch: str | None, manifest: dict) -> tuple[dict, dict]:
    """(name -> model, config dict or {}) for the weights file at `path`, checked against the
    manifest's classes wherever the file (or the last.pt beside a best-<net>.pt) records them."""
    from fastkd.checkpoint import check_same_classes, is_checkpoint, load_file, network_state, state_from_file
    from fastkd.models import build_model, load_teacher, load_weights

    obj = load_file(path)
    num_classes = len(manifest["classes"])
    if is_checkpoint(obj):
        if obj.get("num_classes") != num_classes:
            raise FastKDError(f"{path} has {obj.get('num_classes')} classes, the data {num_classes}")
        if "classes" in obj:
            check_same_classes(obj["classes"], manifest["classes"], str(path))
        archs = obj.get("archs")
        if not isinstance(archs, dict):
            raise FastKDError(f"checkpoint {path} has no 'archs': not a complete fastkd checkpoint")
        nets = {}
        for name, a in archs.items():
            nets[name] = build_model(a, num_classes)
            load_weights(nets[name], network_state(obj, path, name), path, a)
        return nets, obj.get("config", {})
    run = RunLayout.of_checkpoint(path)  # RUN/checkpoints/best-<net>.pt -> RUN/config.yaml
    config = yaml.safe_load(run.config.read_text()) if run is not None and run.config.is_file() else {}
    config = config or {}
    if arch is None:
        arch = arch_of_best(path, config)
    state_from_file(obj, path, arch)  # validates it is a state_dict
    return {arch: load_teacher(str(path), arch, manifest)}, config


def arch_of_best(path: Path, config: dict) -> str:
    """Architecture of RUN/checkpoints/best-<net>[-ema].pt: the run's config.yaml names it
    (model.students, by network name: resnet18, resnet18-2, timm:...); without one, the file
    name (the network name is the architecture, maybe suffixed -2)."""
    from fastkd.models import network_names

    net = path.stem.removeprefix(BEST_PREFIX).removesuffix("-ema")
    students = config.get("model", {}).get("students") or []
    by_name = dict(zip(network_names(students), students))
    if net in by_name:
        return by_name[net]
    return net.rsplit("-", 1)[0] if net.rsplit("-", 1)[-1].isdigit() else net


def pick_network(nets: dict, name: str, path: Path) -> dict:
    """The one network --arch names among a checkpoint's several (said on stderr); FastKDError
    listing them when none is that one: evaluating them all would answer another question."""
    if name not in nets:
        raise FastKDError(f"--arch {name}: {path} holds the networks {', '.join(nets)} and no {name}, and there is no "
                          f"best-{name}.pt beside it; pass --arch with one of those names, or that network's weights")
    say(f"fastkd eval: no best-{name}.pt in {path.parent}; evaluating network {name} of {path}")
    return {name: nets[name]}


def run(args: argparse.Namespace) -> int:
    from fastkd.checkpoint import resolve_weights_path
    from fastkd.data import build_loader
    from fastkd.evaluate import evaluate
    from fastkd.packformat import load_manifest

    device = resolve_device(args.device, flag="--device")  # before any loading: a wrong flag fails fast
    from fastkd.models import network_names

    path = resolve_weights_path(args.checkpoint, network_names([args.arch])[0] if args.arch else None)
    manifest = load_manifest(args.data)
    nets, config = load_networks(path, args.arch, manifest)
    if args.arch and len(nets) > 1:  # a run folder without best-<arch>.pt resolved to last.pt
        nets = pick_network(nets, network_names([args.arch])[0], path)
    data_cfg = config.get("data", {})
    backend = args.backend or data_cfg.get("backend", "ffcv")
    resolution = args.resolution or data_cfg.get("val_resolution", 224)
    batch_size = args.batch_size or data_cfg.get("batch_size", 256)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loader = build_loader(args.data, "val", backend, batch_size, resolution, device, dtype, num_workers=args.num_workers)
    nets = {name: net.to(device) for name, net in nets.items()}
    res = evaluate(nets, loader)

    print_results(path, args.data, resolution, {name: res[name] for name in nets})
    show(f"val pipeline: {val_pipeline(loader)}")  # backends resize differently: say which one scored
    return 0


def print_results(weights, data, resolution: int, res: dict[str, dict]) -> None:
    """The weights and data paths, whole on their own lines (in a title or cell, a narrow terminal
    would wrap them), then one table row per network of `res` (fastkd.evaluate's results)."""
    from rich.table import Table

    show(f"weights: {weights}")
    show(f"data: {data}")
    table = Table(title=f"val, {resolution} px")
    for column in ("network", "top-1 %", "top-5 %", "loss", "ECE %", "images"):
        table.add_column(column, justify="left" if column == "network" else "right")
    for name, r in res.items():
        table.add_row(name, f"{r['top1']:.2f}", f"{r['top5']:.2f}", f"{r['loss']:.4f}", f"{100 * r['ece']:.2f}", str(r["n"]))
    show(table)

"""Each list of names (loader backends, compile modes, amp values, loss methods) is written once
and every other place derives from it: these tests fail when a second hand-written copy drifts.

Owners: fastkd.data.spec.LOADERS (backends), fastkd.runtime.COMPILE_MODES / AMP_MODES,
fastkd.losses.METHODS, fastkd.cacheformat.ARRAY_NAMES (a teacher cache's arrays). `scan_copies` walks the source for collection literals of those names
outside their owner, so a copy pasted back in is caught even before it drifts.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from fastkd import runtime
from fastkd.cacheformat import ARRAY_NAMES, LOGIT_ARRAYS, VIEW_ARRAYS, array_specs, storage_for
from fastkd.config import CompileConfig, DataConfig, PrecisionConfig, resolve_config
from fastkd.data import build_loader
from fastkd.data.spec import AUTO, BACKEND_CHOICES, BACKENDS, LOADERS
from fastkd.errors import FastKDError
from fastkd.losses import METHODS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# list name -> (its names, the owner file, the fewest names a collection literal needs to count as a copy)
LISTS = {
    "loader backends": (set(BACKEND_CHOICES), "fastkd/data/spec.py", 4),
    "compile modes": (set(runtime.COMPILE_MODES), "fastkd/runtime.py", 3),
    "amp values": (set(runtime.AMP_MODES), "fastkd/runtime.py", 3),
    "loss methods": (set(METHODS), "fastkd/losses.py", 3),
    "teacher cache arrays": (set(ARRAY_NAMES), "fastkd/cacheformat.py", 3),
}


def _hint(cls, name):
    return get_args(get_type_hints(cls)[name])


# ----------------------------------------------------------------------------- backends


def test_config_accepts_exactly_the_table_backends():
    assert _hint(DataConfig, "backend") == BACKEND_CHOICES == (*LOADERS, AUTO)
    for name in BACKEND_CHOICES:
        assert resolve_config(None, {"data.backend": name}, check=False).data.backend == name
    with pytest.raises(FastKDError, match="data.backend"):
        resolve_config(None, {"data.backend": "nosuch"}, check=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_build_loader_takes_each_table_backend_with_its_options(tmp_path, backend):
    """Past the name check, the option check quotes the table's options (no data read yet)."""
    expected = f"backend '{backend}' does not take option(s) ['bogus']; it takes {sorted(LOADERS[backend].options)}"
    with pytest.raises(FastKDError) as error:
        build_loader(tmp_path, "val", backend, 1, 8, "cpu", "fp32", bogus=1)
    assert str(error.value) == expected


def test_build_loader_refuses_names_outside_the_table(tmp_path):
    with pytest.raises(FastKDError) as error:
        build_loader(tmp_path, "val", "nosuch", 1, 8, "cpu", "fp32")
    assert str(error.value) == f"unknown loader backend 'nosuch'; choose one of {', '.join(BACKEND_CHOICES)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_entry_names_its_loader_and_probe(backend):
    """The lazy loader path leads to the class of that backend; a backend with an install hint
    has an available() probe in its module and one without needs none."""
    entry = LOADERS[backend]
    assert entry.loader_class().backend == backend
    module = importlib.import_module(entry.module)
    assert hasattr(module, "available") == (entry.install is not None)


def test_benchmarks_list_every_backend_once():
    import e2e_throughput
    import loader_throughput

    for script in (loader_throughput, e2e_throughput):
        assert sorted(script.BACKENDS) == sorted(BACKENDS), script.__name__
    assert loader_throughput.BACKENDS[0] == "folder"  # the baseline of the ratios runs first
    assert {target for target, _ in loader_throughput.VARIANTS.values()} <= set(BACKEND_CHOICES)


# ----------------------------------------------------------------------------- compile, amp, methods


def test_config_compile_and_amp_values_are_runtime_s():
    assert _hint(CompileConfig, "mode") == runtime.COMPILE_MODES
    assert _hint(PrecisionConfig, "amp") == runtime.AMP_MODES == ("auto", *runtime.AMP_DTYPES)
    # every mode but the two that are not a torch.compile call has its arguments
    assert set(runtime.COMPILE_ARGS) == set(runtime.COMPILE_MODES) - {"auto", "none"}


def _choices(parser, flag):
    return tuple(next(a for a in parser._actions if flag in a.option_strings).choices)


def test_cli_choices_derive_from_runtime():
    import argparse

    import step_throughput
    import teacher_cache_step

    from fastkd import cache_cmd

    parser = argparse.ArgumentParser()
    cache_cmd.add_arguments(parser)
    assert _choices(parser, "--amp") == runtime.AMP_MODES
    assert _choices(teacher_cache_step.build_parser(), "--amp") == runtime.AMP_MODES
    assert _choices(teacher_cache_step.build_parser(), "--compile-mode") == runtime.COMPILE_MODES
    assert set(_choices(step_throughput.build_parser(), "--compile-mode")) == set(runtime.COMPILE_MODES) - {"none"}


def test_cache_array_names_are_the_arrays_a_cache_holds():
    """ARRAY_NAMES (what a rebuild clears) is every array array_specs makes, for both storages."""
    for classes in (10, 2000):
        storage = storage_for(classes)
        names = tuple(array_specs(4, 2, classes, storage))
        assert names == (*LOGIT_ARRAYS[storage["kind"]], *VIEW_ARRAYS) and set(names) <= set(ARRAY_NAMES)
    assert set(ARRAY_NAMES) == set(array_specs(4, 2, 2000, storage_for(2000)))


def test_methods_table_reads_the_loss_table():
    import methods_table

    assert methods_table.METHODS is METHODS
    report = {"wall_time_s": 1.0, "networks": {"resnet18": {"top1": 50.0, "top5": 90.0, "ece": 0.1}}}
    for method, flags in METHODS.items():
        row = methods_table.row_for(method, [report])
        assert tuple(row[k] == "yes" for k in ("teacher", "peer", "w")) == flags, method


# ----------------------------------------------------------------------------- no pasted copies


def scan_copies(source: str, names: set[str], least: int) -> list[int]:
    """Lines of tuple/list/set literals, dict keys and Literal[...] arguments in `source` whose
    strings are all from `names`, at least `least` of them: a hand-written copy of that list."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if not isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) or not items:
            continue
        strings = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
        if len(strings) == len(items) and len(strings) >= least and strings <= names:
            lines.append(node.lineno)
    return lines


def test_scanner_catches_a_copy():
    """The scan below can fail: it finds the copies these lists used to have."""
    backends, _, least = LISTS["loader backends"]
    assert scan_copies('B = ("folder", "ffcv", "dali", "torch")\n', backends, least) == [1]
    assert scan_copies('x: Literal[\n "ffcv", "dali", "torch", "folder", "auto"] = "ffcv"\n', backends, least) == [2]
    assert scan_copies('F = {"ffcv": 1, "dali": 2, "torch": 3, "folder": None}\n', backends, least) == [1]
    modes, _, least = LISTS["compile modes"]
    assert scan_copies('c = ("auto", "inductor", "reduce-overhead", "cudagraphs")\n', modes, least) == [1]
    assert scan_copies('LISTED = ("torch", "nvimgcodec", "nvimgcodec-gpu", "ffcv")\n', backends, 4) == []


@pytest.mark.parametrize("what", LISTS)
def test_no_second_copy_in_the_source(what):
    names, owner, least = LISTS[what]
    found = []
    for folder in ("fastkd", "preprocess", "kernels", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel != owner:
                found += [f"{rel}:{line}" for line in scan_copies(path.read_text(encoding="utf-8"), names, least)]
    assert not found, f"{what} written out again (derive them from {owner}): {found}"

"""Reference data shipped inside the package: ImageNet-1k synsets and the ImageNet-100 class list."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True)
class Synset:
    wnid: str  # e.g. "n01440764"
    name: str  # first name of the synset, e.g. "tench"
    imagenet_index: int  # row of every torchvision/timm ImageNet-1k classifier head


def _read_text(name: str) -> str:
    return resources.files("fastkd").joinpath("resources", name).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def imagenet1k_synsets() -> dict[str, Synset]:
    """WNID -> Synset for the 1000 ILSVRC-2012 classes, in head order (sorted by WNID)."""
    synsets: dict[str, Synset] = {}
    for index, line in enumerate(_read_text("imagenet1k_synsets.txt").splitlines()):
        wnid, _, names = line.partition(" ")
        synsets[wnid] = Synset(wnid, names.split(",")[0].strip(), index)
    return synsets


@lru_cache(maxsize=None)
def imagenet100_wnids() -> tuple[str, ...]:
    """The 100 WNIDs of the CMC ImageNet-100 list, sorted (sorted order = label order)."""
    return tuple(sorted(w.strip() for w in _read_text("imagenet100_cmc.txt").split() if w.strip()))

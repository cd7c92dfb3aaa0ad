"""The files of a run folder, named in one place (as fastkd/packformat.py names a pack's).

    layout = RunLayout("runs/uadkd")
    layout.last                  # runs/uadkd/checkpoints/last.pt   (full state, for --resume)
    layout.best("resnet18")      # runs/uadkd/checkpoints/best-resnet18.pt (plain state_dict)
    layout.best("resnet18-ema")  # the EMA copy's best: best-resnet18-ema.pt
    layout.config, layout.metrics, layout.report_json, layout.report_md

    RUN/config.yaml  metrics.jsonl  report.json  report.md  plots/  checkpoints/{last,best-<net>}.pt
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
LAST = "last.pt"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"
BEST_PREFIX = "best-"


def best_name(network: str) -> str:
    """File name of a network's best weights: best-<network>.pt (<network>-ema for an EMA copy)."""
    return f"{BEST_PREFIX}{network}.pt"


def best_network(path: str | Path) -> str | None:
    """The network a best-<network>.pt file is of, else None."""
    name = Path(path).name
    return name.removeprefix(BEST_PREFIX).removesuffix(".pt") if is_best(name) else None


def is_best(name: str) -> bool:
    return name.startswith(BEST_PREFIX) and name.endswith(".pt")


class RunLayout:
    """Paths of the run folder `root`; nothing is created or read here."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> RunLayout | None:
        """The layout of the run a file inside RUN/checkpoints/ belongs to, else None."""
        path = Path(path)
        return cls(path.parent.parent) if path.parent.name == CHECKPOINTS_DIR else None

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    def best(self, network: str) -> Path:
        return self.checkpoints / best_name(network)

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def report_json(self) -> Path:
        return self.root / REPORT_JSON

    @property
    def report_md(self) -> Path:
        return self.root / REPORT_MD

    @property
    def plots(self) -> Path:
        return self.root / PLOTS_DIR

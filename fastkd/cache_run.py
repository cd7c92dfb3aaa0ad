"""A training run's side of a teacher cache (format and reader: fastkd/teacher_cache.py).

    feed, cfg = feed_for_run(cfg, train_loader, resolutions, device)   # checked, attached
    logits = feed.teacher_logits(epoch, indices)                       # [B, C] per step

The cache is checked against the run before a step: pack, classes, resolutions, T_w, the
teacher the run names, and the rows of sampled chunks against their checksums (cheap: a few
chunks are hashed; `fastkd verify CACHE` hashes everything).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fastkd.errors import FastKDError
from fastkd.teacher_cache import CacheFeed, TeacherCache


def feed_for_run(cfg, train_loader, resolutions: set[int], device: torch.device):
    """(CacheFeed, cfg) of a training run with `model.teacher_cache` set: the cache opened and
    checked against the run (pack, classes, every train resolution, T_w, sampled chunk
    checksums), attached to the train loader (which must yield indices), and `cfg` with
    model.teacher naming the cache's teacher, so config.yaml and the report record what trained.
    A run that names another teacher (--teacher other than the default, --teacher-weights other
    than the cache's) is refused: the students would learn from the cache's teacher regardless."""
    expect = {"pack": cfg.data.dir, "classes": train_loader.manifest["classes"], "resolution": resolutions,
              "entropy_temperature": cfg.loss.entropy_temperature}  # fmt: skip
    if cfg.model.teacher != type(cfg.model)().teacher:  # named on purpose: it must be the cache's
        expect["teacher"] = cfg.model.teacher
    cache = TeacherCache.open(cfg.model.teacher_cache, expect=expect, view_seed=cfg.run.seed)
    _check_weights(cfg.model.teacher_weights, cache)
    feed = CacheFeed(cache, device)
    feed.attach(train_loader)
    model = dataclasses.replace(cfg.model, teacher=cache.manifest["teacher"]["arch"])
    return feed, dataclasses.replace(cfg, model=model)


def _check_weights(weights: str | None, cache: TeacherCache) -> None:
    """--teacher-weights next to --teacher-cache must name the weights the cache was made with."""
    made = cache.manifest["teacher"]
    if weights is None or weights == made["weights"] or str(Path(weights).resolve()) == made["weights"]:
        return
    raise FastKDError(f"--teacher-weights {weights} and --teacher-cache {cache.root} name two teachers: the cache "
                      f"holds the logits of {made['arch']} with weights {made['weights']}, which are what the "
                      "students learn from; drop --teacher-weights (`--teacher-weights null` clears a config file's) or build a "
                      "cache of those weights")

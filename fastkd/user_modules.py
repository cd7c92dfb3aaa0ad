"""The config of a run that trains the user's own modules (`fastkd.fit(students=...)`,
`Trainer(cfg, students=...)`).

    cfg = config_for_modules(cfg, {"small": my_resnet}, my_teacher)   # model.students = ["ResNet"]

Kept apart from fastkd.api so the trainer can use it without importing the API that drives it.
"""

from __future__ import annotations

import dataclasses

from fastkd.config import TrainConfig, validate


def config_for_modules(cfg: TrainConfig, students, teacher) -> TrainConfig:
    """`cfg` with model.students / model.teacher naming the user's modules (their class names),
    so the saved config, the checks and the report describe what really trains."""
    nets = list(students.values()) if isinstance(students, dict) else list(students)
    archs = [type(n).__name__ for n in nets]
    model = dataclasses.replace(cfg.model, students=archs,
                                teacher=type(teacher).__name__ if teacher is not None else cfg.model.teacher)  # fmt: skip
    cfg = dataclasses.replace(cfg, model=model)
    validate(cfg)  # 1 or 2 students, two for the peer methods
    return cfg

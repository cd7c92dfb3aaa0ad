"""`fastkd train`'s command line, parsed by tyro from the config dataclasses.

    args = parse_train_argv(["--config", "c.yaml", "--lr", "0.1", "--run.live", "false"])
    args.config       # "c.yaml"
    args.overrides    # {"optim.lr": 0.1, "run.live": False}: the keys the command line set, typed

tyro builds the flags (`--section.key VALUE`), the `--help` text (each field's trailing comment)
and the type conversion from the dataclasses in fastkd.config; this module adds what tyro leaves
to its user:
- the short aliases of ALIASES (`--data D` means `--data.dir D`), listed in `--help`;
- a boolean written with a value, `--run.live false`, as well as tyro's `--run.no_live`;
- `null` or `~` for a field that may be None (tyro spells it `None`), and `a,b` for a list;
- only the keys given on the command line come back, so they lie over a checkpoint's config and
  the YAML file as one more layer (fastkd.config.resolve_config), not over the defaults.

tyro is imported here only, so the trainer, the benchmarks and the API never need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Annotated, Any, get_origin, get_type_hints

from fastkd.config import TrainConfig, accepts_none, section_classes
from fastkd.gc_paused import gc_paused

# Short flags for the keys people type most (the one list: --help shows it).
ALIASES: dict[str, str] = {
    "--data": "data.dir",
    "--backend": "data.backend",
    "--batch-size": "data.batch_size",
    "--method": "loss.method",
    "--students": "model.students",
    "--teacher": "model.teacher",
    "--teacher-weights": "model.teacher_weights",
    "--teacher-cache": "model.teacher_cache",
    "--student-weights": "model.student_weights",
    "--epochs": "schedule.epochs",
    "--lr": "optim.lr",
    "--optimizer": "optim.name",
    "--compile": "compile.mode",
    "--out": "run.out",
    "--resume": "run.resume",
    "--overwrite": "run.overwrite",
    "--log": "run.log",
    "--gpus": "dist.gpus",
}

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class TrainArgs:
    config: str | None  # the YAML file named by --config
    overrides: dict[str, Any]  # "section.key" -> typed value, for the keys the command line set


def _field_types() -> dict[str, Any]:
    """"section.key" -> the field's type, for every config field."""
    return {
        f"{section}.{name}": tp
        for section, cls in section_classes().items()
        for name, tp in get_type_hints(cls).items()
    }


def _flag_key(token: str, types: dict[str, Any]) -> tuple[str, bool] | None:
    """The config key a flag token names and whether it is a `no_` negation, or None."""
    name = token.partition("=")[0]
    if name in ALIASES:
        return ALIASES[name], False
    dotted = name[2:].replace("-", "_") if name.startswith("--") else ""
    if dotted in types:
        return dotted, False
    section, _, key = dotted.partition(".")
    if key.startswith("no_") and f"{section}.{key[3:]}" in types:
        return f"{section}.{key[3:]}", True
    return None


def normalise_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv in tyro's spelling, the config keys it sets in order): aliases expanded, `--flag
    true|false` (and `--flag=false`) turned into `--flag` / `--section.no_key`."""
    types = _field_types()
    out: list[str] = []
    given: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        found = _flag_key(token, types) if token.startswith("--") else None
        if found is None:
            out.append(token)
            continue
        key, negated = found
        given.append(key)
        name, eq, value = token.partition("=")
        if types[key] is bool and not negated:
            word = value if eq else (argv[i] if i < len(argv) and argv[i].lower() in _TRUE + _FALSE else "")
            if word and not eq:
                i += 1
            section, _, field_name = key.partition(".")
            off = word.lower() in _FALSE
            out.append(f"--{section}.{'no_' if off else ''}{field_name}")
            continue
        flag = f"--{key}" if name in ALIASES else name
        if eq:
            out.append(f"{flag}={_none_word(value, types[key])}")
            continue
        out.append(flag)
        if i < len(argv):
            argv_next = _none_word(argv[i], types[key])
            if argv_next != argv[i]:
                out.append(argv_next)
                i += 1
    return out, given


def _none_word(value: str, tp: Any) -> str:
    """`null` and `~` (YAML's words for None) in tyro's spelling, for a field that may be None."""
    return "None" if value in ("null", "~") and accepts_none(tp) else value


def _from_cli(value: Any, tp: Any) -> Any:
    """tyro's parsed value in the config's own spelling: comma-separated list items split."""
    if get_origin(tp) is list and isinstance(value, list):
        return [part.strip() if isinstance(part, str) else part
                for item in value
                for part in (item.split(",") if isinstance(item, str) else [item])
                if not isinstance(part, str) or part.strip()]
    return value


def _help_text(description: str) -> str:
    width = max(len(alias) for alias in ALIASES)
    aliases = "\n".join(f"  {alias:<{width}}  --{key}" for alias, key in ALIASES.items())
    return (f"{description.rstrip()}\n\nShort aliases:\n\n{aliases}\n\nBooleans: --run.live, --run.no_live "
            "or --run.live false. None: null. Lists: a b or a,b.")


def parse_train_argv(argv: list[str], prog: str = "fastkd train", description: str = "") -> TrainArgs:
    """Parse `fastkd train`'s arguments (exit 2 with tyro's message on a bad flag or value;
    `--help` prints the help and exits 0)."""
    import tyro  # the command line's library, loaded only when a command line is parsed

    config_help = "YAML config file, laid over the defaults before the flags"
    command = make_dataclass("Command", [  # --config, then the config's flags without a prefix
        ("config", Annotated[str | None, tyro.conf.arg(help=config_help, metavar="YAML")], field(default=None)),
        ("cfg", Annotated[TrainConfig, tyro.conf.arg(name="")], field(default_factory=TrainConfig)),
    ])

    tyro_argv, given = normalise_argv(argv)
    with gc_paused():  # tyro parses the config's source for its help (see fastkd.gc_paused)
        parsed = tyro.cli(command, args=tyro_argv, prog=prog, description=_help_text(description),
                          use_underscores=True)
    types = _field_types()
    overrides = {}
    for key in given:
        section, _, name = key.partition(".")
        overrides[key] = _from_cli(getattr(getattr(parsed.cfg, section), name), types[key])
    return TrainArgs(parsed.config, overrides)


def config_flags() -> list[str]:
    """Every `--section.key` flag, for docs and tests."""
    return [f"--{key}" for key in _field_types()]


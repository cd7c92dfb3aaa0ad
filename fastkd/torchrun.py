"""torch.distributed.run as `fastkd train --gpus N` starts it, saying one line per event.

    python -m fastkd.torchrun --standalone --nproc_per_node 2 -m fastkd.cli train --config C

The launcher (fastkd.distributed.relaunch) and the ranks already say what happened: the launcher
that it got a signal, rank 0 where it saved or what it refused. torchrun itself then adds a
25-line SignalException traceback after a stop signal, a 40-line ChildFailedError table after a
rank's error, and warnings as it closes the workers. Here torchrun runs unchanged, with its
elastic loggers off (unless LOGLEVEL is set) and those two exceptions turned into exit
codes: silence when rank 0 said it already, else one line naming the first failed rank.

`report_error` is the rank side: only rank 0 prints a FastKDError (every rank usually raises the
same one); the others write it to their torchrun error file, where the one line above finds it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from fastkd.notes import current_rank, say

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # set by torchrun for each rank


def report_error(text: str) -> None:
    """Print `text` on stderr from rank 0 or outside torchrun; on other ranks, write it to the
    rank's torchrun error file (read back by `main` should rank 0 not fail). Rank 0 writes its
    file too, first, marked `printed`: when another rank fails first and torchrun stops rank 0
    after it printed, `main` knows the error was said."""
    rank0 = current_rank() == 0
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with open(path, "w") as f:
            json.dump({"message": text, "timestamp": int(time.time()), "printed": rank0}, f)
    say(text)  # rank 0 only, as `printed` above says


def quiet_elastic_loggers() -> None:
    """torchrun's own log lines (closing signals, OMP threads, "failed (exitcode: 2)") off,
    unless LOGLEVEL asks: `main` says what failed, once."""
    if "LOGLEVEL" in os.environ:
        return
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def failure_line(failures: dict) -> tuple[int, str | None]:
    """(exit code, line or None) for torchrun's failed ranks {global rank: ProcessFailure}: None
    when rank 0 exited with a code of its own (it printed why: an error, or where it saved);
    else one line naming the first failed rank, its exit code or signal, and its message."""
    zero = failures.get(0)
    if zero is not None and zero.exitcode > 0:
        return zero.exitcode, None
    # a rank that exited on its own, before the ones torchrun then stopped with a signal
    exited = [r for r, f in failures.items() if f.exitcode > 0]
    rank = min(exited or failures)
    failure = failures[rank]
    code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    printed = zero is not None and isinstance(zero.error_file_data, dict) and zero.error_file_data.get("printed")
    if printed:  # rank 0 said its error, then torchrun stopped it because another rank exited first
        return code, None
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message)
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    said = message if message and not message.startswith("To enable traceback") else "see its output above"
    return code, f"fastkd train: rank {rank} failed ({how}): {said}"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    quiet_elastic_loggers()
    try:
        run.main(argv)
    except SignalException as stop:  # the launcher said why; rank 0 where it saved
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        code, line = failure_line(failed.failures)
        if line:
            say(line, rank=0)  # torchrun's own process: no rank of the job, the one that reports
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

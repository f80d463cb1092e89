"""``python -m gantrain`` and the ``gantrain`` command: the CLI, with a stop signal during its imports (a few
seconds: torch, rich, typer) answered by one line and exit code 128 + N instead of a KeyboardInterrupt traceback."""

import os
import signal
import sys

STATUS_ENV = "GANTRAIN_LAUNCH_STATUS"  # gantrain.engine.dist.worker.STATUS_ENV, not imported: that takes seconds


def _stopped_while_starting(signum, _frame):
    """Ends the process at once: nothing was done yet, and a SystemExit raised here could surface inside a C++
    call of an import (torch.distributed's), which then aborts with "terminate called after throwing"."""
    if not os.environ.get(STATUS_ENV):  # a DDP worker says nothing: its launcher says the one line
        sys.stderr.write(f"error: {signal.Signals(signum).name} while gantrain was starting; nothing was done\n")
        sys.stderr.flush()
    os._exit(128 + signum)


def main() -> None:
    handled = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup SIGHUP stays ignored
        handled.append(signal.SIGHUP)
    previous = {sig: signal.signal(sig, _stopped_while_starting) for sig in handled}
    from gantrain.cli import main as cli_main

    if not os.environ.get(STATUS_ENV):  # a worker keeps it until the launch code takes the signals over
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    cli_main()


if __name__ == "__main__":
    main()

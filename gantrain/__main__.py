import os
import signal
import sys

if os.environ.get("GANTRAIN_LAUNCH_STATUS"):  # launch.STATUS_ENV, not imported: that takes seconds
    # A worker of `gantrain run --ddp` told to stop while still importing: exit quietly with 128 + N (the
    # launcher says the line); gantrain.engine.dist.launch and the training loop take the signals over later.
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, lambda signum, _frame: sys.exit(128 + signum))

from gantrain.cli import main  # noqa: E402

main()

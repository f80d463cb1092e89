"""What a run saves: atomic writes and the folder lock (``files``), the run folder's layout (``rundir``), the
checkpoint schema (``schema``) and checkpoints (``checkpoint``)."""

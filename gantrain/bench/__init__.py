"""`gantrain bench`: the tutorial-style baseline and the engine's feature matrix, timed side by side."""

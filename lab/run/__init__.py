"""A run directory and what lives in it: its file names, summary, status and lock (rundir),
checkpoints, the metrics log, SIGTERM handling, and the branch points a config declares."""

"""Studies made of many runs, above analysis/: sweeps, branching with the schedule law's
prediction, the `lab plan` next-rung planner, and the whole demo study."""

"""The scaling lab's training side. Importing it keeps JAX off the TPU backend on a host with
no TPU chips (lab.backend.choose_platforms, as the `lab` command does), so that a script or
notebook using `lab` or `analysis` as a library sees no libtpu start-up warnings; JAX_PLATFORMS
set by the user wins, and TPU-topology compiles still load libtpu for its compiler
(lab.train.aot)."""

from lab.backend import choose_platforms

choose_platforms()

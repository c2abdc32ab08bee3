"""Run one command as several jax.distributed processes on this machine, as the hosts of a pod
slice would run it:

    python -m launch.local --processes 2 --devices 4 -- lab train configs/tiny.yaml

Each process gets LAB_COORDINATOR=127.0.0.1:PORT (a free port), LAB_NUM_PROCESSES,
LAB_PROCESS_ID, LAB_LOCAL_DEVICES and JAX_PLATFORMS=cpu; `lab` reads them in
lab.accel.sharding.initialize_distributed. Every output line is prefixed with its process id. When a
process fails, the others are stopped (SIGTERM, then SIGKILL after --grace seconds) and the
launcher exits with the failed process's status, so a run never hangs on a dead peer.
SIGINT and SIGTERM are forwarded to every process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from lab.errors import UserError
from launch.common import after_dashes, resolve_command, run_main


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(index: int, processes: int, devices: int, port: int,
              base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process `index`: the contract with lab.accel.sharding."""
    env = dict(os.environ if base is None else base)
    env.update(LAB_COORDINATOR=f"127.0.0.1:{port}", LAB_NUM_PROCESSES=str(processes),
               LAB_PROCESS_ID=str(index), LAB_LOCAL_DEVICES=str(devices), JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    return env


NO_COMMAND = ("no command to launch; put it after --, e.g. python -m launch.local --processes 2 "
              "--devices 4 -- lab train configs/tiny.yaml")


def _pump(index: int, stream: IO[bytes], out: IO[str], lock: threading.Lock) -> None:
    """Copy a child's output to ours, a line at a time, each line prefixed with its id."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        with lock:
            out.write(f"[{index}] {line}\n")
            out.flush()
    stream.close()


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Signal a child's whole process group (its own children too), if it still runs."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass


def _stop_all(procs: list[subprocess.Popen], signum: int | None, grace: float) -> None:
    """Send `signum` (if any) to every running child; SIGKILL whatever still runs after
    `grace` seconds."""
    for p in procs:
        if signum is not None:
            _signal_group(p, signum)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        _signal_group(p, signal.SIGKILL)
    for p in procs:
        p.wait()


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as shells report


def launch(command: list[str], processes: int, devices: int, port: int | None = None,
           grace: float = 20.0, out: IO[str] | None = None) -> int:
    """Run `command` as `processes` processes with `devices` CPU devices each; returns the exit
    status: 0 when all succeed, else the first failure's (128 + N for signal N)."""
    if processes < 1 or devices < 1:
        raise UserError(f"--processes and --devices must be at least 1, got {processes} and "
                        f"{devices}")
    argv = resolve_command(command, NO_COMMAND)
    out = out or sys.stdout
    port = port or free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    received: list[int] = []

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        for p in procs:
            _signal_group(p, signum)

    handlers = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(processes):
            # A session of its own: a terminal's Ctrl-C reaches the child only through us.
            p = subprocess.Popen(argv, env=child_env(i, processes, devices, port),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True)
            t.start()
            pumps.append(t)
        status = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if received:
                _stop_all(procs, None, grace)  # `forward` has signalled them already
                status = 128 + received[0]
                break
            if failed:
                i, code = failed[0]
                with lock:
                    out.write(f"launch.local: process {i} exited with status "
                              f"{_exit_status(code)}; stopping the others\n")
                    out.flush()
                _stop_all(procs, signal.SIGTERM, grace)
                status = _exit_status(code)
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.1)
    finally:
        for p in procs:  # only reached with live children if launching itself failed
            _signal_group(p, signal.SIGKILL)
        for s, h in handlers.items():
            signal.signal(s, h)
    for t in pumps:
        # The children have exited, so each pipe ends soon; the bound is for a grandchild that
        # keeps it open. 5 s once lost a child's last line on a loaded 2-core CI machine.
        t.join(timeout=30)
    return status


def build_parser() -> argparse.ArgumentParser:
    from lab.errors import ArgumentParser

    parser = ArgumentParser(
        prog="python -m launch.local",
        description="Run a command as several jax.distributed processes on this machine, each "
                    "with its own CPU devices, as the hosts of a pod slice would run it.",
        epilog="example: python -m launch.local --processes 2 --devices 4 -- lab train "
               "configs/tiny.yaml")
    parser.add_argument("--processes", type=int, default=2, help="number of processes (hosts)")
    parser.add_argument("--devices", type=int, default=4, help="CPU devices per process")
    parser.add_argument("--port", type=int, default=0,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--grace", type=float, default=20.0,
                        help="seconds a process gets to exit after SIGTERM before SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the command, e.g. -- lab train configs/tiny.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), lambda args: launch(
        after_dashes(args.command), args.processes, args.devices, port=args.port or None,
        grace=args.grace), argv)


if __name__ == "__main__":
    sys.exit(main())

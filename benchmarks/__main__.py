"""Run the benchmarks and print one table: `python -m benchmarks [--quick] [--only TOPIC,...]`.

Every benchmarks/bench_<topic>.py exposes `run(quick: bool = False) -> list[dict]`; each row has
figure, value, unit, reference, reference_value, ratio and notes, and may have best (a timed
figure's value is the median of its repeats, best the fastest). Each topic runs in its own
Python process (fresh memory and XLA state, and its own peak RSS); a topic that fails or times
out becomes a row saying so, and the others still run. The rows, the machine's description and
each topic's time, peak memory and load average go to benchmarks/results/<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import table_head, table_line

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COLUMNS = ("figure", "value", "unit", "reference", "reference_value", "ratio", "notes")


def topics() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


# ----------------------------------------------------------------------------- one topic (child)


def _child(topic: str, quick: bool, out: str) -> int:
    """Run one topic in this process and write its rows (or its error) to `out` as JSON."""
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.bench_{topic}")
        rows = module.run(quick=quick)
        result = {"status": "ok", "rows": [_clean(r) for r in rows]}
    except BaseException as e:  # noqa: BLE001 (any failure is reported as a row)
        result = {"status": "failed", "rows": [],
                  "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                  "traceback": traceback.format_exc()}
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(result))
    return 0 if result["status"] == "ok" else 1


def _clean(row: dict) -> dict:
    """A row with exactly the convention's keys and plain JSON types."""
    missing = [k for k in COLUMNS if k not in row]
    if missing:
        raise ValueError(f"benchmark row {row.get('figure')!r} lacks {missing}")
    out = {k: row[k] for k in COLUMNS}
    out["best"] = row.get("best")
    for key in ("value", "best", "reference_value", "ratio"):
        out[key] = None if out[key] is None else float(out[key])
    return out


# ----------------------------------------------------------------------------- the runner


def run_topic(topic: str, quick: bool, timeout: float | None) -> dict:
    """Run one topic in a subprocess; always returns a result dict, never raises."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks", "--child", topic, "--child-out", str(out)]
        if quick:
            cmd.append("--quick")
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            stderr, code = proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            err = e.stderr or ""
            stderr = err.decode(errors="replace") if isinstance(err, bytes) else err
            code = None
        seconds = time.perf_counter() - started
        if out.exists():
            result = json.loads(out.read_text())
        else:  # killed, timed out, or crashed before writing (e.g. out of memory)
            last = [line for line in stderr.strip().splitlines() if line.strip()][-1:]
            why = (f"timed out after {timeout:.0f} s" if code is None
                   else f"exit status {code}: {last[0][:300] if last else 'no output'}")
            result = {"status": "failed", "rows": [], "error": why,
                      "peak_rss_mib": None, "traceback": stderr[-4000:]}
    result["wall_seconds"] = seconds
    result["load_before"] = load_before
    result["load_after"] = os.getloadavg()
    return result


def machine() -> dict:
    """The machine's description; devices are asked of a child so this process stays light."""
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": os.getloadavg(),
    }
    probe = ("import json, jax, jaxlib; print(json.dumps({'jax': jax.__version__, "
             "'jaxlib': jaxlib.__version__, 'backend': jax.default_backend(), "
             "'devices': [str(d) for d in jax.devices()], "
             "'device_kind': jax.devices()[0].device_kind}))")
    try:
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (subprocess.SubprocessError, IndexError, json.JSONDecodeError) as e:
        info["devices_error"] = f"{type(e).__name__}: {e}"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def table(results: dict[str, dict]) -> str:
    """One Markdown table of every topic's rows; a failed topic is one row saying why."""
    lines = table_head()
    for topic, result in results.items():
        rows = list(result["rows"])
        if result["status"] != "ok":
            rows.append({"figure": "FAILED", "value": None, "best": None, "unit": "",
                         "reference": "",
                         "reference_value": None, "ratio": None, "notes": result["error"]})
        peak = result.get("peak_rss_mib")
        rows.append({"figure": "topic wall time (peak RSS of its process)",
                     "value": result["wall_seconds"], "best": None, "unit": "s",
                     "reference": "",
                     "reference_value": None, "ratio": None,
                     "notes": (f"peak RSS {peak:,.0f} MiB; " if peak else "")
                     + "load average before/after {:.1f}/{:.1f}".format(
                         result["load_before"][0], result["load_after"][0])})
        lines += [table_line(topic, r) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    parser.add_argument("--only", default="", help="comma-separated topics, e.g. train,data "
                        f"(available: {', '.join(topics())})")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds one topic may take (default 3600)")
    parser.add_argument("--out", default=str(HERE / "results"),
                        help="directory for the JSON results (default benchmarks/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.quick, args.child_out)

    chosen = [t.strip() for t in args.only.split(",") if t.strip()] or topics()
    unknown = sorted(set(chosen) - set(topics()))
    if unknown:
        print(f"error: unknown benchmark topic {unknown[0]!r}; available: "
              f"{', '.join(topics())}", file=sys.stderr)
        return 2
    started = datetime.datetime.now().astimezone()
    info = machine()
    print(f"{info['cpu_model']}, {info['cpu_count']} CPUs, {info['memory_gib']} GiB, "
          f"jax {info.get('jax')}, {info.get('backend')} {info.get('devices')}, python "
          f"{info['python']}; load average {info['load_average'][0]:.1f}", flush=True)
    results = {}
    for topic in chosen:
        print(f"running {topic}{' (quick)' if args.quick else ''} ...", flush=True)
        results[topic] = run_topic(topic, args.quick, args.timeout)
        r = results[topic]
        print(f"  {r['status']} in {r['wall_seconds']:.0f} s"
              + (f": {r['error']}" if r["status"] != "ok" else ""), flush=True)
    print()
    print(table(results))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{info['host']}-{started:%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}.json"
    record = {"started": started.isoformat(timespec="seconds"), "quick": args.quick,
              "machine": info, "topics": results,
              "rows": [{"topic": t, **row} for t, r in results.items() for row in r["rows"]]}
    path.write_text(json.dumps(record, indent=1))
    print(f"\nresults: {path}")
    return 1 if any(r["status"] != "ok" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

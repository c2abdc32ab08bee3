"""What a run shows while it trains: a live line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import Any, TextIO


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """What a run shows while it trains. On a terminal, one live line (a tqdm bar) with the
    smoothed loss, tokens/s, MFU and the time left, evaluations printed above it; otherwise
    (a log file, a pipe) one plain line per logged step. The time left counts training steps
    only: the compilation and the evaluations are left out."""

    SMOOTHING = 0.1  # weight of the newest logged loss in the smoothed loss

    def __init__(self, total_steps: int, enabled: bool, stream: TextIO | None = None,
                 live: bool | None = None):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.live = enabled and (self.stream.isatty() if live is None else live)
        self.bar: Any = None
        self.smoothed: float | None = None

    def compiling(self) -> None:
        if self.enabled:
            print("compiling the training step…", end="", file=self.stream, flush=True)

    def compiled(self, seconds: float) -> None:
        if self.enabled:
            print(f" {seconds:.1f} s", file=self.stream, flush=True)

    def show(self, step: int, metrics: dict, seconds_per_step: float) -> None:
        if not self.enabled:
            return
        loss = metrics["loss"]
        self.smoothed = loss if self.smoothed is None else (
            (1 - self.SMOOTHING) * self.smoothed + self.SMOOTHING * loss)
        eta = _format_eta((self.total - step) * seconds_per_step)
        mfu = f" | MFU {metrics['mfu']:.1%}" if metrics.get("mfu") else ""
        speed = f"{metrics['tokens_per_second']:,.0f} tok/s{mfu}"
        if not self.live:
            extra = f" | eval {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
            print(f"step {step:>6}/{self.total} | loss {loss:.4f}{extra} | "
                  f"lr {metrics['lr']:.2e} | {speed} | ETA {eta}", file=self.stream, flush=True)
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=step, file=self.stream, dynamic_ncols=True,
                            bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {postfix}")
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(f"loss {self.smoothed:.4f} | lr {metrics['lr']:.2e} | {speed}"
                                 f" | ETA {eta}")
        if "eval_loss" in metrics:
            self.bar.write(f"step {step:>6}/{self.total} | loss {loss:.4f} | eval "
                           f"{metrics['eval_loss']:.4f}", file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_call(progress: Any, method: str, *args: Any) -> None:
    """Call an optional method of a progress display (a caller's own may have only show)."""
    fn = getattr(progress, method, None)
    if fn is not None:
        fn(*args)

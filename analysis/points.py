"""Tables of (N, D, C, loss) points: reading them from CSV files and checking them.

A points table has one row per trained model (or per logged step, for training curves) with
columns `N` (parameters), `D` (tokens), `C` (training FLOPs) and `loss`. A CSV needs `N`,
`loss` and one of `D` or `C`; the missing one follows from C = 6 N D (Hoffmann et al. 2022).
The layout of Epoch AI's digitised Chinchilla data (`Model Size`, `Training FLOP`, `loss`) is
accepted as well.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import numpy as np
import pandas as pd

from lab import paths
from lab.errors import UserError, shown

# Other names for our columns, as used by published data sets.
ALIASES = {
    "Model Size": "N",
    "Training FLOP": "C",
    "Training Tokens": "D",
    "params": "N",
    "tokens": "D",
    "flops": "C",
    "final_eval_loss": "loss",
}


def read_points_csv(path: str, tokens: bool = True) -> pd.DataFrame:
    """Read a CSV of points into a frame with columns N, D, C, loss (and any others it has);
    without `tokens` (a law at one token count, such as the MoE law) D and C may be absent."""
    text = paths.read_input(path)
    try:
        df = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        reason = " ".join(str(err).split())  # pandas's messages end in a newline
        raise UserError(
            f"{path} is not a readable CSV ({reason}); give a CSV with a header row"
        ) from None
    header = next(csv.reader(io.StringIO(text)), [])
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise UserError(f"{path} has the column {shown(twice[0])} twice; keep one (pandas would "
                        "keep both under other names)")
    df = df.rename(columns={k: v for k, v in ALIASES.items() if v not in df.columns})
    _check_numbers(df, path)
    missing = [c for c in ("N", "loss") if c not in df.columns]
    if tokens and "D" not in df.columns and "C" not in df.columns:
        missing.append("D or C")
    if missing:
        need = "N, loss and D or C" if tokens else "N and loss"
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}; a points CSV needs {need}")
    df = complete_points(df)
    df["source"] = str(path)
    return df


def _check_numbers(df: pd.DataFrame, path: str) -> None:
    """Refuse a given value of N, D, C or loss that is not a finite number (text, or beyond
    float64's range as 1e400 is), naming its row and line in the file."""
    for col in ("N", "D", "C", "loss"):
        if col not in df.columns:
            continue
        given = df[col].notna().to_numpy()
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = given & ~np.isfinite(values)
        if bad.any():
            row = int(np.argmax(bad))
            raw = df[col].iloc[row]
            value = shown(raw) if isinstance(raw, str) else raw
            raise UserError(f"{path}: {col} in row {row} (line {row + 2}) is {value}, not a "
                            "finite number (or beyond float64's range); fix or remove that row")


def complete_points(df: pd.DataFrame) -> pd.DataFrame:
    """Fill in whichever of D and C is missing, from C = 6 N D (neither when both are)."""
    df = df.copy()
    for col in ("N", "D", "C", "loss"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    if "D" not in df.columns and "C" not in df.columns:
        return df
    if "D" not in df.columns:
        df["D"] = df["C"] / (6.0 * df["N"])
    if "C" not in df.columns:
        df["C"] = 6.0 * df["N"] * df["D"]
    return df


def check_points(
    df: pd.DataFrame,
    columns: Sequence[str] = ("N", "D", "loss"),
    *,
    min_points: int = 1,
    what: str = "the fit",
) -> None:
    """Raise UserError unless `columns` exist and hold finite positive numbers, enough of them."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{what} needs column(s) {', '.join(missing)}; add them to the input")
    for col in columns:
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            raise UserError(
                f"{col} has {bad.sum()} missing or non-numeric value(s) (first at row "
                f"{int(np.argmax(bad))}); remove or fix those rows"
            )
        if (values <= 0).any():
            first = int(np.argmax(values <= 0))
            raise UserError(
                f"{col} must be positive, row {first} has {values[first]:g}; remove or fix it"
            )
    if len(df) < min_points:
        raise UserError(
            f"{what} needs at least {min_points} points and got {len(df)}; add more runs"
        )


def drop_highest_loss(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Leave out the k points of highest loss, as Besiroglu et al. (2024) do before fitting."""
    if k <= 0:
        return df
    if k >= len(df):
        raise UserError(f"cannot drop {k} of {len(df)} points; lower --drop-highest-loss")
    return df.drop(index=df["loss"].nlargest(k).index)


def group_budgets(C, rel_tol: float = 0.1) -> np.ndarray:
    """Label each compute value with its budget: sorted values within a factor (1 + rel_tol) of
    their neighbour share a label. Labels count up from 0 in order of compute."""
    logc = np.log(np.asarray(C, dtype=np.float64))
    order = np.argsort(logc)
    gaps = np.diff(logc[order]) > np.log1p(rel_tol)
    labels = np.empty(len(logc), dtype=np.int64)
    labels[order] = np.concatenate([[0], np.cumsum(gaps)]) if len(logc) else []
    return labels

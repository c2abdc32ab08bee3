"""orbax checkpoints of a run: model, optimizer state, step and data-iterator state together.

Saves are asynchronous (the loop goes on while the arrays are written); orbax writes each step
into a temporary directory and renames it when complete, so a killed save is never listed.
A latest checkpoint that exists but cannot be read (truncated, corrupt) is skipped with a
warning and the one before it restored; when the resumed run reaches that step again, its save
replaces the unreadable one. Restoring onto a target that carries NamedShardings of
the current mesh re-shards exactly, so a run saved on one mesh resumes on another.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from lab import paths
from lab.errors import FIXES, STORAGE_ERRNOS, UserError, file_system_error
from lab.run.rundir import CHECKPOINTS

# URL schemes orbax can write checkpoints to: etils.epath handles the files and tensorstore
# the arrays, and both know Cloud Storage (and S3), not fsspec's other filesystems.
CHECKPOINT_SCHEMES = ("gs://", "s3://")


def checkpoint_dir(run_dir: str) -> str:
    """Where orbax keeps a run's checkpoints: RUN_DIR/checkpoints, absolute if local."""
    if paths.is_remote(run_dir) and not str(run_dir).startswith(CHECKPOINT_SCHEMES):
        raise UserError(f"checkpoints cannot be written to {run_dir} (orbax supports local "
                        "paths and gs://); use a local or gs:// run.dir")
    return paths.absolute(paths.join(run_dir, CHECKPOINTS))


# How long a failed restore waits for orbax's worker threads to finish failing.
FAILED_RESTORE_SETTLE_SECONDS = 1.0


@contextlib.contextmanager
def _held_stderr() -> Iterator[None]:
    """Hold what is printed to stderr while a restore runs: on success it is passed on; when a
    restore of an unreadable checkpoint fails, orbax's tensorstore callbacks still running
    print 'Event loop is closed' tracebacks from other threads, which are noise after the
    one-line message that explains the failure, so they are dropped."""
    real, held = sys.stderr, io.StringIO()
    sys.stderr = held
    try:
        yield
    except BaseException:
        time.sleep(FAILED_RESTORE_SETTLE_SECONDS)
        raise
    else:
        real.write(held.getvalue())
    finally:
        sys.stderr = real


def _not_a_failed_orbax_read(record: logging.LogRecord) -> bool:
    """A logging filter that drops asyncio's 'Task exception was never retrieved' reports for
    orbax's own reads.

    When a restore fails, orbax has started one read task per array; the first error is raised
    (and explained in one line), and the others are left unretrieved. asyncio logs each when it
    is garbage-collected, which may be at exit, through whatever handler logging has, so
    holding sys.stderr does not catch them. Other asyncio reports pass."""
    message = str(record.msg)
    return not (message.startswith("Task exception was never retrieved") and "/orbax/" in message)


def _drop_failed_read_reports() -> None:
    """From the first restore on, drop the reports of a failed restore's unretrieved read tasks
    (installed before the restore: orbax's own event loop may free them before it raises)."""
    logging.getLogger("asyncio").addFilter(_not_a_failed_orbax_read)  # once: a set


class Checkpointer:
    """The checkpoints of one run directory (`RUN_DIR/checkpoints`, local or gs://)."""

    def __init__(self, directory: str, keep_last: int = 2, keep_steps: tuple[int, ...] = (),
                 read_only: bool = False, unreadable: set[int] | frozenset[int] = frozenset()):
        keep = [policies.LatestN(keep_last)]
        if keep_steps:
            keep.append(policies.CustomSteps(list(keep_steps)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=True,
            read_only=read_only,
            create=not read_only,
        )
        self.directory = directory
        # Steps found unreadable (by this restore, or by the caller's): saving one replaces it.
        self.unreadable = set(unreadable)
        self.manager = ocp.CheckpointManager(directory, options=options,
                                             item_names=("state", "data"))

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any | None = None) -> bool:
        """Start an asynchronous save; returns False if this step is already saved (and
        readable: an unreadable one is deleted and saved again). A disk that refuses the
        checkpoint (full, read-only) is a UserError naming the last complete one."""
        with self._refusals(f"write the checkpoint of step {step}"):
            return self._save(step, state, data_iterator)

    def _save(self, step: int, state: Any, data_iterator: Any | None) -> bool:
        if step in self.manager.all_steps():
            if step not in self.unreadable:
                return False
            self.manager.wait_until_finished()
            self.manager.delete(step)
            self.unreadable.discard(step)
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def saved_keys(self, step: int) -> set[str] | None:
        """The top-level keys of the state saved at `step`, or None if they cannot be read."""
        try:
            saved = ocp.StandardCheckpointer().metadata(
                paths.join(self.directory, str(step), "state"))
            return set(saved.item_metadata.keys())
        except Exception:  # noqa: BLE001 (unreadable: the restore below says so)
            return None

    def restore(self, abstract_state: Any, data_iterator: Any | None = None,
                step: int | None = None, fresh: dict[str, Any] | None = None
                ) -> tuple[int, Any] | None:
        """Restore `step` (default: the newest readable one) onto the shardings carried by
        `abstract_state` (a tree of jax.ShapeDtypeStruct with NamedShardings). Returns
        (step, state), or None when there is no checkpoint. The data iterator, if given, is
        set to its saved position. `fresh` maps top-level keys of the state that checkpoints
        written before them lack to a function that makes their starting value."""
        steps = self.steps()
        if step is not None:
            if step not in steps:
                raise UserError(f"no checkpoint at step {step} in {self.directory}; "
                                f"available: {steps or 'none'}")
            candidates = [step]
        else:
            candidates = steps[::-1]
        _drop_failed_read_reports()
        for candidate in candidates:
            saved = self.saved_keys(candidate) if fresh else None
            missing = [k for k in fresh if k not in saved] if saved is not None else []
            target = ({k: v for k, v in abstract_state.items() if k not in missing} if missing
                      else abstract_state)
            items = {"state": ocp.args.StandardRestore(target)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                with _held_stderr():
                    restored = self.manager.restore(candidate,
                                                    args=ocp.args.Composite(**items))
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 (any unreadable checkpoint: try the previous)
                gc.collect()  # report (and drop) the failed reads now, not at exit
                if step is not None:
                    raise UserError(f"checkpoint {candidate} in {self.directory} cannot be read "
                                    f"({type(e).__name__}); choose another step") from None
                self.unreadable.add(candidate)
                print(f"warning: checkpoint {candidate} in {self.directory} cannot be read "
                      f"({type(e).__name__}: {str(e)[:200]}); trying the previous one",
                      file=sys.stderr)
                continue
            state = restored["state"]
            for key in missing:
                print(f"note: checkpoint {candidate} predates the state's {key!r}; it starts "
                      "afresh", file=sys.stderr)
                state = {**state, key: fresh[key]()}
            return candidate, state
        return None

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        with self._refusals("finish writing a checkpoint"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    @contextlib.contextmanager
    def _refusals(self, doing: str) -> Iterator[None]:
        """Turn a file system's refusal anywhere in an error's chain (orbax wraps it) into one
        line that says which complete checkpoint the run can resume from."""
        try:
            yield
        except Exception as e:
            refusal = _file_system_refusal(e)
            if refusal is None:
                raise
            self.manager.reload()
            done = sorted(set(self.manager.all_steps()) - self.unreadable)
            last = (f"the last complete checkpoint is step {done[-1]}, where the same command "
                    "resumes" if done else "no checkpoint of this run is complete")
            raise file_system_error(refusal, f"{doing} in {self.directory}",
                                    f"{last}; {FIXES[refusal.errno]}") from None


def _file_system_refusal(error: BaseException) -> OSError | None:
    """The OSError of a full or read-only disk in `error`'s chain of causes, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the target shardings, for an exact re-sharding restore."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)

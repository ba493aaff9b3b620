"""Conventions shared by every experiment: command line, run directory, tables, caching.

An experiment module has a frozen dataclass ``Config`` (with a ``smoke: bool`` field that
makes the run finish in seconds, and optionally ``out_dir: str`` and ``resume: str | None``),
an importable ``run(config) -> dict`` and ``main()`` calling :func:`cli`. Its run writes,
through :class:`RunDir`, under ``<directory>/<timestamp>/`` (``<directory>/smoke/<timestamp>/``
for a smoke run):

* ``config.json`` — written first, the config as JSON;
* ``provenance.json`` — per invocation: library versions, git commit, command line, host;
* ``metrics.jsonl`` — one JSON object per :meth:`RunDir.log` call;
* ``results.json`` — :meth:`RunDir.write_results`;
* ``summary.md`` — :meth:`RunDir.write_summary` (tables from :func:`markdown_table`);
* ``*.png`` — :meth:`RunDir.savefig` (matplotlib, Agg backend);
* ``.lock`` — while a process uses the directory: its pid, host and start time.

JSON files are written atomically (a temporary file renamed over the target), so an
interrupted run never leaves half a file; a JSON-lines file whose last line was cut by a
crash loses that line (:func:`read_jsonl`). An interrupted experiment resumes in its old
directory with ``resume="latest"`` (the newest run that started) or the directory's path;
the new config must equal the stored one (the location fields ``out_dir`` and ``resume``
aside, so a moved or copied run directory resumes). One process at a time uses a run
directory or a :func:`cached` value: a second one is refused (:class:`RunDirInUse`) or, for
a cache, waits.

The harness every experiment shares, so that a module holds only its config, data, arms,
metrics and claims:

* :func:`run_cells` — every ``(arm, seed)`` cell computed once, stored in ``cells.jsonl``,
  read back on resume, one progress bar; :func:`seed_table` and :func:`aggregate` /
  :func:`stat_rows` — per arm, each metric's values per seed and their mean ± std (with n);
* :class:`Claim` — a paper's claim about two arms' metric, judged seed by seed with the
  verdicts :data:`REPRODUCES`, :data:`ON_AVERAGE`, :data:`DOES_NOT_REPRODUCE`,
  :data:`NOT_RUN` (an arm it compares did not run); :func:`check_claims` gives the rows for
  results.json, :func:`claims_markdown` the summary.md section;
* :func:`figure`, :func:`plot_curves` (± std bands), :func:`plot_bars` (error bars),
  :func:`plot_heatmaps` (one shared colour scale), :func:`finish_figure` — titled, labelled.

A sketch of an experiment's ``run``::

    run_dir = RunDir(config.out_dir, config)
    cells = run_cells(run_dir, ARMS, config.seeds, lambda arm, seed: train(arm, seed))
    table = seed_table(cells)
    rows = check_claims(CLAIMS, table, smoke=config.smoke)
    run_dir.write_results({"table": table, "claims": rows})
    run_dir.write_summary(markdown_table(stat_rows(table, COLUMNS)) + "\n\n"
                          + claims_markdown(rows, smoke=config.smoke))
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

__all__ = [
    "CELLS_FILE",
    "DOES_NOT_REPRODUCE",
    "LOCATION_FIELDS",
    "NOT_CHECKED",
    "NOT_RUN",
    "ON_AVERAGE",
    "REPRODUCES",
    "Claim",
    "DirectoryLock",
    "RunDir",
    "RunDirInUse",
    "Stat",
    "aggregate",
    "cached",
    "check_claims",
    "claims_markdown",
    "cli",
    "config_dict",
    "config_stamp",
    "figure",
    "finish_figure",
    "format_mean_std",
    "markdown_table",
    "mean_std",
    "plot_bars",
    "plot_curves",
    "plot_heatmaps",
    "provenance",
    "read_cells",
    "read_jsonl",
    "run_cells",
    "seed_table",
    "stat",
    "stat_rows",
    "undocumented_fields",
    "verdict",
]

ConfigT = TypeVar("ConfigT")
_RUN_NAME = re.compile(r"^(\d{8}-\d{6})(?:-(\d+))?$")
LOCATION_FIELDS = frozenset({"out_dir", "resume"})
"""Config fields that say where a run lives, not what it computes: left out of the resume
check and of :func:`config_stamp`."""
_BOOKKEEPING = frozenset({"config.json", "provenance.json", ".lock"})
SMOKE_NOTE = "Smoke run: numbers are not results."


class _Opened(NamedTuple):
    """A run directory opened by this process (cli prints and cleans them up)."""

    path: Path
    resumed: bool
    release: Callable[[], Any]

    def discard_if_unstarted(self) -> None:
        """Removes a new run directory that holds nothing but its bookkeeping (the run failed
        before it started, e.g. on a bad option value): ``resume="latest"`` must not pick it."""
        if self.resumed or not self.path.is_dir() or _has_output(self.path):
            return
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)
        print(f"run directory: {self.path} removed (the run failed before writing anything)")


_OPENED: list[_Opened] = []
_ANNOUNCE = False  # set by cli: print the run directory when it is opened


def _note(text: str) -> None:
    """A message for the person running the experiment (stderr; not a Python warning)."""
    print(f"jaxmtl: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- command line


def cli(config_cls: type[ConfigT], run: Callable[[ConfigT], Any], *, args=None) -> Any:
    """Parses the command line into ``config_cls`` with tyro and returns ``run(config)``.

    Every field becomes an option (``--smoke`` / ``--no-smoke`` for a bool, ``--seeds 0 1 2``
    for a tuple); ``--help`` lists them with the comments written beside the fields. The
    path of every :class:`RunDir` the run opens is printed when it is opened and at the end;
    one the run opened but wrote nothing into (beyond its config) before failing, e.g. on a
    misspelled option value, is removed.

    Args:
      config_cls: a dataclass type (frozen by convention), every field with a default.
      run: the experiment's ``run(config)``.
      args: the arguments to parse (default: ``sys.argv[1:]``).

    >>> @dataclasses.dataclass(frozen=True)
    ... class Config:
    ...     smoke: bool = False
    ...     steps: int = 100
    >>> cli(Config, lambda c: c.steps // 10 if c.smoke else c.steps, args=["--smoke"])
    10
    """
    import tyro

    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"config_cls must be a dataclass type, got {config_cls!r}")
    description = (config_cls.__doc__ or "").strip() or None
    config = tyro.cli(config_cls, args=args, description=description, prog=_prog(run))
    global _ANNOUNCE
    before, announce = len(_OPENED), _ANNOUNCE
    _ANNOUNCE = True
    try:
        result = run(config)
    except BaseException:
        for opened in _OPENED[before:]:
            opened.discard_if_unstarted()
        raise
    finally:
        _ANNOUNCE = announce
    for opened in _OPENED[before:]:
        print(f"run directory: {opened.path} (done)", flush=True)
    return result


def _prog(run: Callable) -> str | None:
    """``python -m experiments.NAME``: the usage line of the experiment module ``run`` is
    defined in (``None`` for a function defined elsewhere than in a module file)."""
    module = getattr(run, "__module__", None)
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else None
    if not module or module.startswith(("__", "<")):
        return None
    return f"python -m {module}"


def undocumented_fields(config_cls: type) -> list[str]:
    """The fields of ``config_cls`` that ``--help`` would show without a description (no
    comment beside the field, no docstring under it): each option should say what it does.
    tyro reads the descriptions from the source file, so a class defined interactively has
    none. In an experiment's test::

        assert undocumented_fields(loss_zoo.Config) == []
    """
    from tyro import _docstrings

    return [
        f.name
        for f in dataclasses.fields(config_cls)
        if not _docstrings.get_field_docstring(config_cls, f.name, ())
    ]


# --------------------------------------------------------------------------- JSON


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__array__"):  # NumPy and JAX arrays
        return np.asarray(value).tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"cannot write a {type(value).__name__} as JSON: {value!r}")


def _dumps(value: Any, **kwargs) -> str:
    return json.dumps(value, default=_json_default, **kwargs)


def _write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_dict(config: Any) -> dict[str, Any]:
    """The config as stored in ``config.json``: JSON values (tuples become lists).

    >>> @dataclasses.dataclass(frozen=True)
    ... class Config:
    ...     smoke: bool = False
    ...     seeds: tuple[int, ...] = (0, 1)
    >>> config_dict(Config())
    {'smoke': False, 'seeds': [0, 1]}
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    return json.loads(_dumps(dataclasses.asdict(config)))


def config_stamp(config: Any) -> str:
    """The config as one canonical JSON string without its location fields
    (:data:`LOCATION_FIELDS`): the key under which a run stores finished pieces of work, the
    same in a moved or copied run directory.

    >>> @dataclasses.dataclass(frozen=True)
    ... class Config:
    ...     steps: int = 10
    ...     out_dir: str = "runs/demo"
    >>> config_stamp(Config()) == config_stamp(Config(out_dir="elsewhere"))
    True
    >>> config_stamp(Config())
    '{"steps": 10}'
    """
    fields = {k: v for k, v in config_dict(config).items() if k not in LOCATION_FIELDS}
    return json.dumps(fields, sort_keys=True)


# --------------------------------------------------------------------------- JSON lines


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    r"""The records of a JSON-lines file (``[]`` if it does not exist).

    A last line cut short by a crash in the middle of a write (unterminated and not JSON) is
    dropped from the file (a note on stderr says so), so that the next append starts on a
    fresh line; any other line that is not JSON raises ``ValueError`` naming the file and the
    line number.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = Path(d) / "cells.jsonl"
    ...     _ = path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    ...     print(read_jsonl(path), repr(path.read_text()))
    [{'a': 1}, {'a': 2}] '{"a": 1}\n{"a": 2}\n'
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, offset = [], 0
    for number, raw in enumerate(lines, 1):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            if number == len(lines):  # the last line, without its newline: a cut write
                with path.open("r+b") as f:
                    f.truncate(start)
                _note(f"dropped the incomplete last line {number} of {path} (an interrupted write)")
                break
            raise ValueError(
                f"{path}, line {number}: not JSON ({error}); fix or remove that line"
            ) from error
    return records


# --------------------------------------------------------------------------- run directory


def _run_key(path: Path) -> tuple[str, int]:
    match = _RUN_NAME.match(path.name)
    assert match is not None
    return match.group(1), int(match.group(2) or 0)


def _runs_in(directory: Path) -> list[Path]:
    """The run directories (``<timestamp>[-n]`` holding a config.json), oldest first."""
    if not directory.is_dir():
        return []
    runs = [
        p
        for p in directory.iterdir()
        if p.is_dir() and _RUN_NAME.match(p.name) and (p / "config.json").is_file()
    ]
    return sorted(runs, key=_run_key)


def _has_output(path: Path) -> bool:
    """Whether the run directory holds anything beyond its bookkeeping files (a file in it or
    below it): whether the run really started."""
    for entry in path.iterdir():
        if entry.is_file() and entry.name not in _BOOKKEEPING:
            return True
        if entry.is_dir() and any(p.is_file() for p in entry.rglob("*")):
            return True
    return False


def _started_runs(directory: Path) -> list[Path]:
    """The runs under ``directory`` that started (wrote something) or are in use now, oldest
    first: a run that failed before writing anything is not one to resume."""
    return [p for p in _runs_in(directory) if _has_output(p) or _lock_is_held(p / ".lock")]


class RunDir:
    """The directory of one experiment run: ``<directory>/<timestamp>/``.

    Args:
      directory: the experiment's directory, by convention ``runs/<name>`` (any root works).
      config: the run's config, a dataclass instance; written to ``config.json`` first.
      resume: ``None`` for a new run; ``"latest"`` to continue the newest run under
        ``directory`` that started (wrote something beyond its config; a new one if there is
        none); or the path of an earlier run directory. The stored config must equal
        ``config`` (the location fields ``out_dir`` and ``resume`` aside), else
        ``ValueError`` listing the differing fields. Defaults to ``config.resume`` when the
        config has such a field.

    A smoke run (``config.smoke`` true) lives under ``<directory>/smoke/``, apart from the
    real ones. The directory is locked (``.lock``: pid, host, start time) until
    :meth:`close`, the end of a ``with`` block, or the object's deletion; another process
    asking for it meanwhile gets :class:`RunDirInUse` (this process may open it again). Each
    invocation appends its :func:`provenance` to ``provenance.json``.

    Attributes:
      path: the run directory (a ``Path``).
      resumed: whether an earlier run directory is being continued.

    >>> import tempfile
    >>> @dataclasses.dataclass(frozen=True)
    ... class Config:
    ...     smoke: bool = True
    >>> with tempfile.TemporaryDirectory() as root:
    ...     run = RunDir(Path(root) / "demo", Config())
    ...     run.log({"step": 1, "loss": np.float32(0.5)})
    ...     print(sorted(p.name for p in run.path.iterdir()), run.resumed)
    ...     print(RunDir(Path(root) / "demo", Config(), resume="latest").path == run.path)
    ...     print(run.path.parent.name)
    ['.lock', 'config.json', 'metrics.jsonl', 'provenance.json'] False
    True
    smoke
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        config: Any,
        *,
        resume: str | os.PathLike | None = None,
        timestamp: str | None = None,
    ):
        stored_now = config_dict(config)
        if resume is None:
            resume = getattr(config, "resume", None)
        self.config = config
        directory = Path(directory)
        if getattr(config, "smoke", False) is True:
            directory = directory / "smoke"
        previous: Path | None = None
        if resume is not None and str(resume) == "latest":
            runs = _started_runs(directory)
            previous = runs[-1] if runs else None
        elif resume is not None:
            previous = Path(resume)
            if not (previous / "config.json").is_file():
                raise FileNotFoundError(
                    f"resume={str(resume)!r}: no config.json in {previous} (not a run directory)"
                )
        if previous is not None:
            _check_same_config(previous / "config.json", stored_now)
            self.path, self.resumed = previous, True
            self._lock = DirectoryLock(previous / ".lock", what="run directory", target=previous)
            self._lock.acquire()
            for path in previous.glob("*.jsonl"):  # drop a line cut by the crash, if any
                read_jsonl(path)
        else:
            self.path, self.resumed = _new_run_path(directory, timestamp), False
            self._lock = DirectoryLock(self.path / ".lock", what="run directory", target=self.path)
            self._lock.acquire()
            _write_atomic(self.path / "config.json", _dumps(stored_now, indent=2) + "\n")
        self._release = weakref.finalize(self, self._lock.release)
        self._record_provenance()
        _OPENED.append(_Opened(self.path, self.resumed, self._release))
        if _ANNOUNCE:
            state = "resumed" if self.resumed else "new"
            print(f"run directory: {self.path} ({state})", flush=True)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, resumed={self.resumed})"

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            _Opened(self.path, self.resumed, self._release).discard_if_unstarted()
        self.close()

    def close(self) -> None:
        """Releases the directory's lock (idempotent; also done when the object is deleted)."""
        self._release()

    def _record_provenance(self) -> None:
        path = self.path / "provenance.json"
        record: dict[str, Any] = {"invocations": []}
        if path.exists():
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                aside = _move_aside(path, "unreadable")
                _note(f"cannot read {path} ({error}); moved it to {aside}")
        record.setdefault("invocations", []).append(provenance())
        _write_atomic(path, _dumps(record, indent=2) + "\n")

    def log(self, metrics: Mapping[str, Any]) -> None:
        """Appends ``metrics`` (a dict; arrays and NumPy scalars allowed) as one line of
        ``metrics.jsonl``."""
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
        line = _dumps(dict(metrics))
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(line + "\n")

    def read_metrics(self) -> list[dict]:
        """The lines of ``metrics.jsonl`` (``[]`` if none; see :func:`read_jsonl`)."""
        return read_jsonl(self.path / "metrics.jsonl")

    def write_results(self, results: Mapping[str, Any]) -> Path:
        """Writes ``results.json`` atomically; returns its path."""
        if not isinstance(results, Mapping):
            raise TypeError(f"results must be a dict, got {type(results).__name__}")
        path = self.path / "results.json"
        _write_atomic(path, _dumps(dict(results), indent=2) + "\n")
        return path

    def write_summary(self, markdown: str) -> Path:
        """Writes ``summary.md`` atomically; returns its path. A smoke run's summary starts
        with :data:`SMOKE_NOTE` (say nothing there that reads as a result, e.g. no verdicts
        on paper claims)."""
        if not isinstance(markdown, str):
            raise TypeError(f"markdown must be a str, got {type(markdown).__name__}")
        if self.smoke:
            markdown = f"> **{SMOKE_NOTE}**\n\n{markdown}"
        path = self.path / "summary.md"
        _write_atomic(path, markdown if markdown.endswith("\n") else markdown + "\n")
        return path

    def write_text(self, name: str, text: str) -> Path:
        """Writes ``text`` to the file ``name`` in the run directory atomically; returns its
        path (e.g. a table beside summary.md)."""
        if not name or "/" in name or os.sep in name:
            raise ValueError(f"name must be a plain file name, got {name!r}")
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        path = self.path / name
        _write_atomic(path, text)
        return path

    def savefig(self, fig, name: str, *, dpi: int = 110, close: bool = True) -> Path:
        """Saves a matplotlib figure as ``<name>.png`` in the run directory (and closes it);
        returns the path."""
        if not name or "/" in name or os.sep in name:
            raise ValueError(f"name must be a plain file name, got {name!r}")
        path = self.path / (name if name.endswith(".png") else f"{name}.png")
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)
        return path

    @property
    def smoke(self) -> bool:
        """Whether this is a smoke run (``config.smoke``)."""
        return getattr(self.config, "smoke", False) is True

    def cached_json(self, name: str, stamp: str, compute: Callable[[], Any]) -> Any:
        """A finished piece of work stored as ``name`` (JSON) in the run directory.

        Returns the stored result if ``name`` holds one computed under ``stamp`` (e.g.
        :func:`config_stamp` plus the piece's own settings); else runs ``compute()`` and stores
        its result atomically with the stamp. A file that cannot be read is moved aside
        (``<name>.unreadable-<time>``, reported on stderr) and the piece recomputed.
        """
        if not name or "/" in name or os.sep in name:
            raise ValueError(f"name must be a plain file name, got {name!r}")
        path = self.path / name
        if path.exists():
            try:
                stored = json.loads(path.read_text())
                if not isinstance(stored, dict) or not {"config", "result"} <= set(stored):
                    raise ValueError("expected an object with 'config' and 'result'")
            except (OSError, UnicodeDecodeError, ValueError) as error:
                aside = _move_aside(path, "unreadable")
                _note(f"cannot read {path} ({error}); moved it to {aside}, recomputing")
            else:
                if stored["config"] == stamp:
                    return stored["result"]
        result = compute()
        _write_atomic(path, _dumps({"config": stamp, "result": result}) + "\n")
        return json.loads(_dumps(result))

    def subdir(self, name: str) -> Path:
        """``path/name``, created (e.g. the ``run_dir`` of one :func:`jaxmtl.train.fit`)."""
        path = self.path / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def _new_run_path(directory: Path, timestamp: str | None) -> Path:
    stamp = timestamp or time.strftime("%Y%m%d-%H%M%S")
    if not re.fullmatch(r"\d{8}-\d{6}", stamp):
        raise ValueError(f"timestamp must look like 20250101-120000, got {stamp!r}")
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        path = directory / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"could not create a new run directory under {directory}")


def _check_same_config(path: Path, new: dict[str, Any]) -> None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot resume: {path} is unreadable ({error})") from error
    stored = {k: v for k, v in stored.items() if k not in LOCATION_FIELDS}
    new = {k: v for k, v in new.items() if k not in LOCATION_FIELDS}
    missing = object()
    differ = [
        f"{k}: stored {stored.get(k, '<absent>')!r}, new {new.get(k, '<absent>')!r}"
        for k in sorted(set(stored) | set(new))
        if stored.get(k, missing) != new.get(k, missing)
    ]
    if differ:
        raise ValueError(
            f"cannot resume {path.parent}: its config differs in "
            f"{len(differ)} field(s): " + "; ".join(differ)
        )


# --------------------------------------------------------------------------- locks


class RunDirInUse(RuntimeError):
    """A run directory (or a cache) is in use by another live process."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _describe(owner: dict) -> str:
    return (
        f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} "
        f"(started {owner.get('started', '?')}: {' '.join(owner.get('command', [])) or '?'})"
    )


def _lock_is_held(path: Path) -> bool:
    """Whether a live process holds the lock file ``path`` (this one included)."""
    if not path.exists():
        return False
    if _HELD.get(str(path.absolute()), (None, 0))[0] == os.getpid():
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no flock here (some network file systems): judge by the pid
        owner = _read_owner(path)
        local = owner.get("host") == socket.gethostname()
        return not local or _pid_alive(int(owner.get("pid", -1)))
    finally:
        os.close(fd)
    return False


# lock path -> (pid of the holder, count): a process may open its own run directory again
_HELD: dict[str, tuple[int, int]] = {}
_HELD_FDS: dict[str, int] = {}


class DirectoryLock:
    """An exclusive, inter-process lock held through a lock file.

    The file holds the owner's pid, host, start time and command line; the lock itself is an
    ``flock`` on it, so the operating system releases it when the owner dies, however it
    dies: a lock file left by a dead process is stale and taken over (with a note). On file
    systems without ``flock`` the pid decides (a live pid on this host, or any pid on
    another host, holds the lock). Re-entrant within one process.

    Args:
      path: the lock file (e.g. ``<run directory>/.lock``).
      what, target: how the error names the locked thing ("run directory X is in use ...").

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with DirectoryLock(Path(d) / ".lock").acquire():
    ...         print(json.loads((Path(d) / ".lock").read_text())["pid"] == os.getpid())
    ...     print((Path(d) / ".lock").exists())
    True
    False
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "directory", target=None):
        self.path = Path(path).absolute()
        self.what = what
        self.target = Path(target) if target is not None else self.path.parent
        self._owned = False

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self, *, wait: bool = False, poll: float = 0.2) -> DirectoryLock:
        """Takes the lock; if another live process holds it, raises :class:`RunDirInUse`
        (``wait=False``) or waits for it (``wait=True``, a note on stderr). Returns self."""
        key = str(self.path)
        holder, count = _HELD.get(key, (None, 0))
        if holder == os.getpid():
            _HELD[key] = (holder, count + 1)
            self._owned = True
            return self
        waited = False
        while True:
            owner = self._try_take()
            if owner is None:
                break
            if not wait:
                raise RunDirInUse(
                    f"{self.what} {self.target} is in use by {_describe(owner)}; wait for it "
                    f"to finish, or use another one (if that process is gone, delete {self.path})"
                )
            if not waited:
                _note(f"{self.what} {self.target} is in use by {_describe(owner)}; waiting")
                waited = True
            time.sleep(poll)
        _HELD[key] = (os.getpid(), 1)
        self._owned = True
        return self

    def _try_take(self) -> dict | None:
        """Takes the lock and returns None, or returns the live owner's record."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return _read_owner(self.path) or {"pid": "?"}
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise
                owner = _read_owner(self.path)
                if owner and owner.get("pid") != os.getpid() and _lock_is_held(self.path):
                    os.close(fd)
                    return owner
            try:  # the file may have been replaced between open and flock: retry then
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_owner(self.path)
        if previous.get("pid") not in (None, os.getpid()):
            _note(f"{self.path}: a stale lock of {_describe(previous)} (not running), taken over")
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": list(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        _HELD_FDS[str(self.path)] = fd
        return None

    def release(self) -> None:
        """Releases the lock (idempotent); the lock file is removed by the last holder."""
        if not self._owned:
            return
        self._owned = False
        key = str(self.path)
        holder, count = _HELD.get(key, (None, 0))
        if holder != os.getpid():  # pragma: no cover - a forked child: the parent's lock
            return
        if count > 1:
            _HELD[key] = (holder, count - 1)
            return
        del _HELD[key]
        fd = _HELD_FDS.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding it: a waiter re-checks the inode
        if fd is not None:
            os.close(fd)


def _move_aside(path: Path, why: str) -> Path:
    """Renames ``path`` to ``<path>.<why>-<time>[-n]`` (kept for inspection); returns it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(10_000):
        aside = path.with_name(f"{path.name}.{why}-{stamp}" + (f"-{n}" if n else ""))
        if not aside.exists():
            path.rename(aside)
            return aside
    raise RuntimeError(f"could not move {path} aside")  # pragma: no cover


# --------------------------------------------------------------------------- provenance

_DISTRIBUTIONS = {
    "jax": "jax",
    "jaxlib": "jaxlib",
    "flax": "flax",
    "optax": "optax",
    "numpy": "numpy",
    "orbax": "orbax-checkpoint",
}


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """What produced a result: library versions, the jaxmtl git commit (and whether the tree
    had uncommitted changes; ``"unknown"`` outside a git checkout), the command line, host,
    pid, working directory and time.

    >>> sorted(provenance()["versions"])
    ['flax', 'jax', 'jaxlib', 'numpy', 'optax', 'orbax', 'python']
    """
    from importlib import metadata

    versions = {}
    for name, distribution in _DISTRIBUTIONS.items():
        try:
            versions[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    commit = _git("rev-parse", "HEAD")
    status = None if commit is None else _git("status", "--porcelain", "--untracked-files=no")
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": list(sys.argv),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "versions": versions,
        "git": {
            "commit": commit or "unknown",
            "dirty": "unknown" if status is None else bool(status),
        },
    }


# --------------------------------------------------------------------------- tables


def mean_std(values: Iterable[float], *, ddof: int = 1) -> tuple[float, float]:
    """The mean and standard deviation of ``values`` (over seeds, say).

    ``std`` uses ``ddof=1`` (the sample standard deviation, as papers report "mean ± std over
    n runs"); one value gives ``std = 0``.

    >>> mean, std = mean_std([70.8, 71.2, 71.6])
    >>> print(f"{mean:.3f} {std:.3f}")
    71.200 0.400
    """
    array = np.asarray(list(values), dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {array.shape}")
    mean = float(array.mean())
    std = float(array.std(ddof=ddof)) if array.size > ddof else 0.0
    return mean, std


def format_mean_std(values: Iterable[float], *, digits: int = 1, scale: float = 1.0) -> str:
    """``"71.2 ± 0.4"``: :func:`mean_std` of ``scale * values`` with ``digits`` decimals.

    >>> format_mean_std([0.708, 0.712, 0.716], scale=100)
    '71.2 ± 0.4'
    """
    mean, std = mean_std([scale * float(v) for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}" if math.isfinite(value) else str(float(value))
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts); ``columns`` default to the keys in order of
    first appearance. Missing cells are empty; floats are shown with 4 significant digits.

    >>> print(markdown_table([{"method": "CE", "acc": 0.91234}, {"method": "MAE"}]))
    | method | acc |
    | --- | --- |
    | CE | 0.9123 |
    | MAE |  |
    """
    rows = list(rows)
    if not all(isinstance(row, Mapping) for row in rows):
        raise TypeError("rows must be a sequence of dicts")
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    columns = [str(c) for c in columns]
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    lines = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- caching


def cached(path: str | os.PathLike, compute_fn: Callable[[], Any], *, like: Any = None) -> Any:
    """A pytree computed once and stored (an orbax checkpoint in directory ``path``).

    The first call runs ``compute_fn()`` (e.g. pretraining a backbone) and saves the result;
    later calls, in this or another process, restore it instead. Both return the restored
    value, so they agree: pass ``like`` (a pytree with the same structure, e.g.
    ``jax.eval_shape`` of the initializer) to get NamedTuples and exact dtypes back; without
    it containers come back as dicts and lists. The cache is keyed by ``path`` only: put the
    settings that determine the value in the path.

    Safe under concurrency and crashes: a lock (``<path>.lock``) makes a second process wait
    while the first computes, the value is written to a temporary directory renamed to
    ``path`` when complete, and a cache that cannot be read is reported on stderr, moved
    aside (``<path>.unreadable-<time>``, kept) and recomputed.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     first = cached(Path(d) / "w", lambda: {"w": np.arange(3.0)})
    ...     again = cached(Path(d) / "w", lambda: 1 / 0)  # not recomputed
    ...     print(again["w"])
    [0. 1. 2.]
    """
    from jaxmtl.checkpoint import CheckpointReadError

    path = Path(path).absolute()
    lock = DirectoryLock(path.with_name(path.name + ".lock"), what="cache", target=path)
    with lock.acquire(wait=True):
        if path.exists():
            try:
                return _restore_cache(path, like)
            except CheckpointReadError as error:
                aside = _move_aside(path, "unreadable")
                _note(f"cannot read the cache {path} ({error}); moved it to {aside}, recomputing")
        value = compute_fn()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _save_cache(tmp, value)
        os.replace(tmp, path)
        return _restore_cache(path, like)


def _save_cache(path: Path, value: Any) -> None:
    from jaxmtl.checkpoint import Checkpointer

    with Checkpointer(path, max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(0, value)
        ckpt.wait()


def _restore_cache(path: Path, like: Any) -> Any:
    from jaxmtl.checkpoint import Checkpointer, CheckpointReadError

    with Checkpointer(path, max_to_keep=1, async_save=False) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointReadError(f"{path} holds no finished checkpoint")
        return ckpt.restore(step, like)


# --------------------------------------------------------------------------- arms x seeds

Arm = str | tuple[str, ...]
"""An arm of an experiment: a name (``"PCGrad"``) or a tuple of names
(``("multi_digits", "PCGrad")``)."""
CELLS_FILE = "cells.jsonl"


def _arm_key(arm: Arm) -> tuple[str, ...]:
    key = (arm,) if isinstance(arm, str) else tuple(arm)
    if not key or not all(isinstance(part, str) for part in key):
        raise TypeError(f"arm: expected a str or a tuple of str, got {arm!r}")
    return key


def _arm_name(arm: Arm) -> str:
    return " / ".join(_arm_key(arm))


def _experiment_name(run_dir: RunDir) -> str:
    parent = run_dir.path.parent
    return parent.parent.name if run_dir.smoke else parent.name


def read_cells(path: str | os.PathLike, stamp: str) -> dict[tuple, Any]:
    """The finished cells stored in the JSON-lines file ``path`` under ``stamp``:
    ``{(*arm, seed): result}``. A line cut by a crash is dropped (that cell is redone; see
    :func:`read_jsonl`); a line that is not a cell record raises ``ValueError``.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = Path(d) / "cells.jsonl"
    ...     _ = path.write_text('{"key": ["EW", 0], "stamp": "s", "result": {"acc": 0.9}}\\n')
    ...     print(read_cells(path, "s"), read_cells(path, "other"))
    {('EW', 0): {'acc': 0.9}} {}
    """
    cells = {}
    for number, record in enumerate(read_jsonl(path), 1):
        if not (isinstance(record, dict) and {"key", "stamp", "result"} <= set(record)):
            raise ValueError(f"{path}, record {number}: expected key, stamp and result")
        if record["stamp"] == stamp:
            cells[tuple(record["key"])] = record["result"]
    return cells


def run_cells(
    run_dir: RunDir,
    arms: Sequence[Arm],
    seeds: Sequence[int],
    compute: Callable[[Arm, int], Mapping[str, Any]],
    *,
    stamp: str | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> dict[Arm, dict[int, dict[str, Any]]]:
    """Every ``(arm, seed)`` cell of an experiment, each computed once and stored.

    ``compute(arm, seed)`` returns the cell's metrics (a dict of JSON values: numbers,
    lists, dicts). Every finished cell is appended to ``cells.jsonl`` in the run directory
    with ``stamp`` (default: :func:`config_stamp` of the run's config) and a line in
    ``metrics.jsonl``; a resumed run reads the finished cells back and computes only the
    missing ones. One progress bar counts the cells (the finished ones included). Cells run
    arm by arm, seeds inner, so a step function compiled for an arm's first seed serves the
    others (:func:`jaxmtl.train.fit` reuses it).

    Returns ``{arm: {seed: metrics}}`` in the order of ``arms`` and ``seeds``; a computed
    cell comes back as a stored one would (through JSON), so a fresh and a resumed run agree.

    >>> import tempfile
    >>> @dataclasses.dataclass(frozen=True)
    ... class Config:
    ...     smoke: bool = True
    >>> with tempfile.TemporaryDirectory() as root:
    ...     run = RunDir(root, Config())
    ...     cells = run_cells(run, ["a", "b"], [0, 1], lambda arm, s: {"x": s + len(arm)})
    ...     again = run_cells(run, ["a", "b"], [0, 1], lambda arm, s: 1 / 0)  # all stored
    ...     print(cells == again, cells["b"])
    True {0: {'x': 1}, 1: {'x': 2}}
    """
    from tqdm.auto import tqdm

    arms, seeds = list(arms), [int(s) for s in seeds]
    keys = [_arm_key(arm) for arm in arms]
    if len(set(keys)) != len(keys) or len(set(seeds)) != len(seeds):
        raise ValueError(f"arms and seeds must be distinct, got {arms} x {seeds}")
    stamp = config_stamp(run_dir.config) if stamp is None else stamp
    path = run_dir.path / CELLS_FILE
    stored = read_cells(path, stamp)
    done = sum((*key, seed) in stored for key in keys for seed in seeds)
    bar = tqdm(
        total=len(arms) * len(seeds),
        initial=done,
        desc=desc or f"{_experiment_name(run_dir)} cells",
        disable=not progress,
    )
    cells: dict[Arm, dict[int, dict[str, Any]]] = {}
    with bar:
        for arm, key in zip(arms, keys, strict=True):
            for seed in seeds:
                if (*key, seed) not in stored:
                    bar.set_postfix_str(f"{_arm_name(arm)}, seed {seed}")
                    start = time.perf_counter()
                    result = compute(arm, seed)
                    if not isinstance(result, Mapping):
                        raise TypeError(
                            f"compute({arm!r}, {seed}) must return a dict, got "
                            f"{type(result).__name__}"
                        )
                    record = {"key": [*key, seed], "stamp": stamp, "result": dict(result)}
                    line = _dumps(record)
                    with path.open("a") as f:
                        f.write(line + "\n")
                    seconds = round(time.perf_counter() - start, 3)
                    run_dir.log({"arm": list(key), "seed": seed, "cell_seconds": seconds})
                    stored[(*key, seed)] = json.loads(line)["result"]
                    bar.update(1)
                cells.setdefault(arm, {})[seed] = stored[(*key, seed)]
    return cells


def seed_table(
    cells: Mapping[Arm, Mapping[int, Mapping[str, Any]]], metrics: Sequence[str] | None = None
) -> dict[Arm, dict[str, list[Any]]]:
    """``{arm: {metric: [value per seed]}}`` from :func:`run_cells`' ``{arm: {seed: metrics}}``
    (``metrics`` default to every key of each arm's first cell).

    >>> seed_table({"EW": {0: {"acc": 0.5}, 1: {"acc": 0.7}}})
    {'EW': {'acc': [0.5, 0.7]}}
    """
    table = {}
    for arm, per_seed in cells.items():
        rows = list(per_seed.values())
        keys = list(rows[0]) if metrics is None and rows else list(metrics or [])
        table[arm] = {k: [row.get(k) for row in rows] for k in keys}
    return table


class Stat(NamedTuple):
    """Mean ± std (``ddof=1``) of a metric over ``n`` seeds."""

    mean: float
    std: float
    n: int

    def format(self, *, digits: int = 1, scale: float = 1.0) -> str:
        """``"71.2 ± 0.4"`` (``scale`` times the mean and std)."""
        return f"{scale * self.mean:.{digits}f} ± {scale * self.std:.{digits}f}"


def stat(values: Iterable[Any]) -> Stat | None:
    """:class:`Stat` of the numbers in ``values`` (``None`` entries, e.g. a metric a method
    does not have, are left out); ``None`` if there are none.

    >>> stat([1.0, None, 2.0, 3.0])
    Stat(mean=2.0, std=1.0, n=3)
    """
    numbers = [float(v) for v in values if v is not None]
    if not numbers:
        return None
    mean, std = mean_std(numbers)
    return Stat(mean, std, len(numbers))


def aggregate(table: Mapping[Arm, Mapping[str, Sequence[Any]]]) -> dict[Arm, dict[str, Stat]]:
    """Per arm and metric of a :func:`seed_table`, the :class:`Stat` over seeds (metrics that
    are not lists of numbers, or have no numbers, are left out).

    >>> aggregate({"EW": {"acc": [0.5, 0.7], "name": "x"}})["EW"]["acc"].format(digits=2)
    '0.60 ± 0.14'
    """
    out: dict[Arm, dict[str, Stat]] = {}
    for arm, metrics in table.items():
        out[arm] = {}
        for key, values in metrics.items():
            if isinstance(values, list | tuple) and all(
                v is None or isinstance(v, int | float | np.number) for v in values
            ):
                summary = stat(values)
                if summary is not None:
                    out[arm][key] = summary
    return out


def stat_rows(
    table: Mapping[Arm, Mapping[str, Sequence[Any]]],
    columns: Mapping[str, tuple[str, float, int]],
    *,
    label: str = "method",
) -> list[dict[str, str]]:
    """Rows for :func:`markdown_table`: one per arm of a :func:`seed_table`, its name under
    ``label``, then per column ``header: (metric, scale, digits)`` the mean ± std over seeds
    (:meth:`Stat.format`; ``"–"`` where the arm lacks the metric).

    >>> table = {"EW": {"acc": [0.70, 0.72]}, "STL": {"acc": [0.75, 0.75], "t": [3.0, 5.0]}}
    >>> print(markdown_table(stat_rows(table, {"acc (%)": ("acc", 100, 1), "s": ("t", 1, 0)})))
    | method | acc (%) | s |
    | --- | --- | --- |
    | EW | 71.0 ± 1.4 | – |
    | STL | 75.0 ± 0.0 | 4 ± 1 |
    """
    rows = []
    for arm, metrics in table.items():
        row = {label: _arm_name(arm)}
        for header, (metric, scale, digits) in columns.items():
            summary = stat(metrics.get(metric, []))
            row[header] = "–" if summary is None else summary.format(digits=digits, scale=scale)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- paper claims

REPRODUCES = "reproduces"
ON_AVERAGE = "same direction on average, not in every seed"
DOES_NOT_REPRODUCE = "does not reproduce"
NOT_RUN = "not run"
NOT_CHECKED = "not checked in a smoke run"
"""The verdicts on a paper claim, the same words in every experiment (:func:`verdict`)."""


def verdict(margins: Sequence[float], *, detail: str = "") -> str:
    """The verdict on a claim from per-seed margins, each positive when that seed goes the
    paper's way: :data:`REPRODUCES` when every seed does, :data:`ON_AVERAGE` when the mean
    does, :data:`DOES_NOT_REPRODUCE` otherwise; with the count of seeds that do (and
    ``detail``, e.g. the measured difference, after it).

    >>> verdict([0.3, 0.1, 0.2])
    'reproduces (3/3 seeds)'
    >>> verdict([0.3, -0.1, 0.2])
    'same direction on average, not in every seed (2/3 seeds)'
    >>> verdict([-0.3, 0.1], detail="difference -0.1 ± 0.3")
    'does not reproduce (1/2 seeds, difference -0.1 ± 0.3)'
    """
    margins = [float(m) for m in margins]
    if not margins:
        return NOT_RUN
    wins, n = sum(m > 0 for m in margins), len(margins)
    if wins == n:
        word = REPRODUCES
    elif float(np.mean(margins)) > 0:
        word = ON_AVERAGE
    else:
        word = DOES_NOT_REPRODUCE
    return f"{word} ({wins}/{n} seeds{', ' + detail if detail else ''})"


@dataclasses.dataclass(frozen=True)
class Claim:
    """A paper's claim about two arms (or one arm and a threshold), judged seed by seed.

    Per seed, the measured value is ``scale * (arm - baseline)`` of ``metric`` (the ratio
    ``arm / baseline`` with ``ratio=True``; ``scale * arm`` with no baseline); the paper's
    direction holds in a seed when that value is above ``threshold`` (``direction="higher"``)
    or below it (``"lower"``). Seeds are paired: both arms ran with the same seeds.

    Attributes:
      paper: who claims it, e.g. ``"F-MTL (Phan et al. 2022), Table 1"``.
      statement: the claim in words, e.g. ``"F-PCGrad beats PCGrad on average accuracy"``.
      metric: the per-seed metric compared (a key of the arms' cells).
      arm: the arm the paper says does better.
      baseline: the arm it is compared with; ``None`` compares ``arm`` with ``threshold``.
      direction: ``"higher"`` or ``"lower"``: where the paper puts the measured value.
      threshold: the value the measured one must pass (0: a plain difference; -2: "within
        2 points"; 5 with ``ratio``: "5x faster").
      ratio: measure ``arm / baseline`` instead of the difference.
      scale: unit of the difference (100: percentage points of a fraction).
      digits: decimals in the report.

    >>> claim = Claim("Paper 2024", "A beats B", "acc", "A", "B", scale=100)
    >>> table = {"A": {"acc": [0.80, 0.82]}, "B": {"acc": [0.75, 0.83]}}
    >>> claim.check(table)["verdict"]
    'same direction on average, not in every seed (1/2 seeds)'
    >>> claim.check({"B": {"acc": [0.75]}})["verdict"]
    'not run (no arm A)'
    """

    paper: str
    statement: str
    metric: str
    arm: Arm
    baseline: Arm | None = None
    direction: str = "higher"
    threshold: float = 0.0
    ratio: bool = False
    scale: float = 1.0
    digits: int = 1

    def __post_init__(self):
        if self.direction not in ("higher", "lower"):
            raise ValueError(f"direction: expected 'higher' or 'lower', got {self.direction!r}")
        if self.ratio and self.baseline is None:
            raise ValueError("ratio=True needs a baseline arm")

    def missing(self, table: Mapping[Arm, Mapping[str, Sequence[Any]]]) -> list[str]:
        """What the claim needs that ``table`` lacks (arms that did not run, the metric)."""
        out = []
        for arm in (self.arm, self.baseline):
            if arm is None:
                continue
            if arm not in table:
                out.append(f"no arm {_arm_name(arm)}")
            elif self.metric not in table[arm] or any(v is None for v in table[arm][self.metric]):
                out.append(f"no metric {self.metric} for {_arm_name(arm)}")
        return out

    def values(self, table: Mapping[Arm, Mapping[str, Sequence[Any]]]) -> list[float]:
        """The measured value per seed (difference, ratio or the arm's own value)."""
        a = [float(v) for v in table[self.arm][self.metric]]
        if self.baseline is None:
            return [self.scale * x for x in a]
        b = [float(v) for v in table[self.baseline][self.metric]]
        if len(a) != len(b):
            raise ValueError(
                f"claim {self.statement!r}: {len(a)} seeds of {_arm_name(self.arm)} against "
                f"{len(b)} of {_arm_name(self.baseline)}"
            )
        if self.ratio:
            return [x / y for x, y in zip(a, b, strict=True)]
        return [self.scale * (x - y) for x, y in zip(a, b, strict=True)]

    def check(
        self, table: Mapping[Arm, Mapping[str, Sequence[Any]]], *, smoke: bool = False
    ) -> dict[str, str]:
        """The claim's row: paper, claim, measured (mean ± std over seeds of the measured
        value) and verdict (:func:`verdict`; :data:`NOT_RUN` naming what is absent;
        :data:`NOT_CHECKED` in a smoke run)."""
        row = {"paper": self.paper, "claim": self.statement, "measured": "", "verdict": ""}
        missing = self.missing(table)
        if missing:
            row["verdict"] = f"{NOT_RUN} ({', '.join(missing)})"
            return row
        values = self.values(table)
        mean, std = mean_std(values)
        d = self.digits
        measured = f"{mean:.{d}f}x ± {std:.{d}f}x" if self.ratio else f"{mean:+.{d}f} ± {std:.{d}f}"
        row["measured"] = measured
        sign = 1.0 if self.direction == "higher" else -1.0
        row["verdict"] = (
            NOT_CHECKED if smoke else verdict([sign * (v - self.threshold) for v in values])
        )
        return row


def check_claims(
    claims: Iterable[Claim],
    table: Mapping[Arm, Mapping[str, Sequence[Any]]],
    *,
    smoke: bool = False,
) -> list[dict[str, str]]:
    """:meth:`Claim.check` of every claim (the rows of results.json's ``"claims"``)."""
    return [claim.check(table, smoke=smoke) for claim in claims]


def claims_markdown(rows: Sequence[Mapping[str, str]], *, smoke: bool = False) -> str:
    """The "paper claims" section of summary.md: how verdicts are reached and a table of
    :func:`check_claims` rows (a smoke run says none were checked).

    >>> print(claims_markdown([], smoke=True))
    Not checked in a smoke run (a few steps: the numbers are not results).
    """
    if smoke:
        return "Not checked in a smoke run (a few steps: the numbers are not results)."
    if not rows:
        return "(no claims)"
    rule = (
        f"Verdicts from the per-seed values (seeds paired across arms): '{REPRODUCES}' when "
        f"every seed goes the paper's way, '{ON_AVERAGE}' when their mean does, "
        f"'{DOES_NOT_REPRODUCE}' otherwise, '{NOT_RUN}' when an arm it compares was not run. "
        "measured: mean ± std over seeds of the compared difference (or ratio)."
    )
    return rule + "\n\n" + markdown_table(rows, ["paper", "claim", "measured", "verdict"])


# --------------------------------------------------------------------------- figures


def figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (6.0, 4.2)):
    """A matplotlib figure (Agg backend) and its axes as a 2-d array, ``size`` per panel.

    >>> fig, axes = figure(1, 2)
    >>> axes.shape, type(fig.get_layout_engine()).__name__
    ((1, 2), 'ConstrainedLayoutEngine')
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(
        nrows,
        ncols,
        figsize=(size[0] * ncols, size[1] * nrows),
        squeeze=False,
        layout="constrained",  # room for titles, tick labels and shared colour bars
    )


def finish_figure(fig, title: str, *, smoke: bool = False):
    """Gives ``fig`` its title (with :data:`SMOKE_NOTE` under it in a smoke run); returns
    ``fig``."""
    fig.suptitle(f"{title}\n{SMOKE_NOTE}" if smoke else title)
    return fig


def _label(ax, *, xlabel: str, ylabel: str, title: str) -> None:
    if not (xlabel and ylabel and title):
        raise ValueError(
            f"a panel needs a title and axis labels, got {title!r}, {xlabel!r}, {ylabel!r}"
        )
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)


def plot_curves(
    ax,
    x: Sequence[float],
    curves: Mapping[str, Sequence[Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    scale: float = 1.0,
    colors: Mapping[str, str] | None = None,
    marker: str | None = "o",
) -> None:
    """One line per curve at the mean over seeds with a ± std band.

    Args:
      ax: a matplotlib axes.
      x: the x values (length P).
      curves: ``{label: per-seed values}``, each an array (seeds, P) (one seed: no band).
      xlabel, ylabel, title: the panel's labels (required).
      scale: multiplies the values (100: fractions shown as %).
      colors: optional colour per label.
      marker: the marker of the mean line.
    """
    x = np.asarray(x, np.float64)
    for label, values in curves.items():
        array = scale * np.asarray(values, np.float64).reshape(-1, len(x))
        mean = array.mean(axis=0)
        std = array.std(axis=0, ddof=1) if array.shape[0] > 1 else np.zeros_like(mean)
        color = (colors or {}).get(label)
        (line,) = ax.plot(x, mean, marker=marker, label=label, color=color)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    _label(ax, xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_bars(
    ax,
    labels: Sequence[str],
    values: Sequence[Sequence[float]] | Mapping[str, Sequence[Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    scale: float = 1.0,
    horizontal: bool = False,
    points: bool = False,
    colors: Sequence[str] | None = None,
    limits: tuple[float, float] | None = None,
) -> None:
    """Bars at the mean over seeds with ± std error bars, one per label.

    Args:
      ax: a matplotlib axes.
      labels: the bars' names (the categories axis).
      values: per label, the per-seed values; or ``{series: per label, per-seed values}``
        for grouped bars (one colour per series, with a legend).
      xlabel, ylabel, title: the panel's labels (required; with ``horizontal`` the
        categories are on the y axis, so ``ylabel`` names them).
      scale: multiplies the values (100: fractions shown as %).
      horizontal: horizontal bars (long names stay readable; the first on top).
      points: points with error bars instead of bars, on an axis zoomed to the data (a
        bar's length on an axis that does not start at 0, or on a log axis, misleads).
      colors: optional colour per label (one series).
      limits: the value axis' limits (e.g. ``(0, 100)`` for a percentage).
    """
    series = dict(values) if isinstance(values, Mapping) else {None: values}
    positions = np.arange(len(labels), dtype=np.float64)
    width = 0.8 / len(series)
    lows, highs = [], []
    for i, (name, per_label) in enumerate(series.items()):
        if len(per_label) != len(labels):
            raise ValueError(f"values: expected {len(labels)} entries, got {len(per_label)}")
        stats = [stat(scale * float(v) for v in seeds) for seeds in per_label]
        means = np.array([np.nan if s is None else s.mean for s in stats])
        stds = np.array([0.0 if s is None else s.std for s in stats])
        finite = np.isfinite(means)
        if finite.any():  # a metric no label has (all NaN) draws nothing
            lows.append(float(np.min((means - stds)[finite])))
            highs.append(float(np.max((means + stds)[finite])))
        where = positions + (i - (len(series) - 1) / 2) * width
        style = {"label": name} if name is not None else {}
        if colors is not None and name is None:
            style["color"] = list(colors)
        if points:
            point_colors = style.get("color") or [f"C{i}"] * len(where)
            error = "xerr" if horizontal else "yerr"
            for p, m, s, c in zip(where, means, stds, point_colors, strict=True):
                xy = (m, p) if horizontal else (p, m)
                ax.errorbar(*xy, **{error: s}, fmt="o", capsize=4, color=c)
            if name is not None:
                ax.plot([], [], "o", color=f"C{i}", label=name)
        elif horizontal:
            ax.barh(where, means, height=width, xerr=stds, capsize=3, **style)
        else:
            ax.bar(where, means, width=width, yerr=stds, capsize=3, **style)
    if horizontal:
        ax.set_yticks(positions, labels, fontsize=8)
        ax.invert_yaxis()
    else:
        ax.set_xticks(
            positions,
            labels,
            rotation=30 if len(labels) > 3 else 0,
            ha="right" if len(labels) > 3 else "center",
            fontsize=8,
        )
    if limits is None and points and lows:
        low, high = min(lows), max(highs)
        pad = max(0.15 * (high - low), 1e-3 * max(abs(high), 1.0))
        limits = (low - pad, high + pad)
    if limits is not None:
        (ax.set_xlim if horizontal else ax.set_ylim)(*limits)
    _label(ax, xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(axis="x" if horizontal else "y", alpha=0.3)
    if len(series) > 1 or next(iter(series)) is not None:
        ax.legend(fontsize=8)


def plot_heatmaps(
    axes: Sequence[Any],
    matrices: Mapping[str, Any],
    *,
    xlabel: str,
    ylabel: str,
    colorbar_label: str,
    xticks: Sequence[str] | None = None,
    yticks: Sequence[str] | None = None,
    cmap: str = "viridis",
    limits: tuple[float, float] | None = None,
    annotate: str | None = "{:.2f}",
    extent: tuple[float, float, float, float] | None = None,
    colorbar: bool = True,
):
    """One heat map per matrix on ``axes`` (titled by the matrix's name) with ONE colour
    scale shared by all of them (``limits``, default the overall min and max; a diverging
    ``cmap`` such as ``"RdBu_r"`` centres it on 0) and one colour bar; returns the image.

    ``annotate`` writes each value into its cell (a format string; ``None``: no text).
    ``extent=(x0, x1, y0, y1)`` draws a matrix over continuous axes instead (row i at
    height y, column j at x, the first row at the bottom; e.g. a grid over two scaling
    coefficients), without index ticks or cell text. ``colorbar=False`` leaves the colour
    bar to the caller (one bar for heat maps drawn by several calls with the same limits).
    """
    arrays = {name: np.asarray(m, np.float64) for name, m in matrices.items()}
    if len(arrays) != len(axes):
        raise ValueError(f"axes: expected {len(arrays)} for the matrices, got {len(axes)}")
    if limits is None:
        low = min(float(np.nanmin(a)) for a in arrays.values())
        high = max(float(np.nanmax(a)) for a in arrays.values())
        if cmap.endswith(("RdBu", "RdBu_r", "coolwarm", "bwr", "seismic")):
            low, high = -max(abs(low), abs(high)), max(abs(low), abs(high))
        limits = (low, high)
    image = None
    for ax, (name, array) in zip(axes, arrays.items(), strict=True):
        if extent is not None:
            image = ax.imshow(
                array, cmap=cmap, vmin=limits[0], vmax=limits[1], origin="lower", extent=extent
            )
            _label(ax, xlabel=xlabel, ylabel=ylabel, title=name)
            continue
        image = ax.imshow(array, cmap=cmap, vmin=limits[0], vmax=limits[1], aspect="auto")
        rows, cols = array.shape
        ax.set_xticks(
            range(cols),
            xticks or [str(j) for j in range(cols)],
            fontsize=8,
            rotation=45 if xticks and max(map(len, xticks)) > 3 else 0,
        )
        ax.set_yticks(range(rows), yticks or [str(i) for i in range(rows)], fontsize=8)
        if annotate:
            for (i, j), v in np.ndenumerate(array):
                r, g, b, _ = image.cmap(image.norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(
                    j,
                    i,
                    annotate.format(v),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
        _label(ax, xlabel=xlabel, ylabel=ylabel, title=name)
    if colorbar:
        axes[0].get_figure().colorbar(image, ax=list(axes), label=colorbar_label, shrink=0.9)
    return image

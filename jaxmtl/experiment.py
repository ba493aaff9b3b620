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
    "LOCATION_FIELDS",
    "DirectoryLock",
    "RunDir",
    "RunDirInUse",
    "cached",
    "cli",
    "config_dict",
    "config_stamp",
    "format_mean_std",
    "markdown_table",
    "mean_std",
    "provenance",
    "read_jsonl",
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
    config = tyro.cli(config_cls, args=args, description=description)
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

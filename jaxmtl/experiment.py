"""Conventions shared by every experiment: command line, run directory, tables, caching.

An experiment module has a frozen dataclass ``Config`` (with a ``smoke: bool`` field that
makes the run finish in seconds, and optionally ``resume: str | None``), an importable
``run(config) -> dict`` and ``main()`` calling :func:`cli`. Its run writes, through
:class:`RunDir`, under ``<directory>/<timestamp>/``:

* ``config.json`` — written first, the config as JSON;
* ``metrics.jsonl`` — one JSON object per :meth:`RunDir.log` call;
* ``results.json`` — :meth:`RunDir.write_results`;
* ``summary.md`` — :meth:`RunDir.write_summary` (tables from :func:`markdown_table`);
* ``*.png`` — :meth:`RunDir.savefig` (matplotlib, Agg backend).

JSON files are written atomically (a temporary file renamed over the target), so an
interrupted run never leaves half a file. An interrupted experiment resumes in its old
directory with ``resume="latest"`` (or the directory's path); the new config must equal the
stored one (``resume`` itself aside).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "RunDir",
    "cached",
    "cli",
    "config_dict",
    "format_mean_std",
    "markdown_table",
    "mean_std",
]

ConfigT = TypeVar("ConfigT")
_RUN_NAME = re.compile(r"^(\d{8}-\d{6})(?:-(\d+))?$")


# --------------------------------------------------------------------------- command line


def cli(config_cls: type[ConfigT], run: Callable[[ConfigT], Any], *, args=None) -> Any:
    """Parses the command line into ``config_cls`` with tyro and returns ``run(config)``.

    Every field becomes an option (``--smoke`` / ``--no-smoke`` for a bool, ``--seeds 0 1 2``
    for a tuple); ``--help`` lists them with the comments written beside the fields.

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
    return run(config)


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


class RunDir:
    """The directory of one experiment run: ``<directory>/<timestamp>/``.

    Args:
      directory: the experiment's directory, by convention ``runs/<name>`` (any root works).
      config: the run's config, a dataclass instance; written to ``config.json`` first.
      resume: ``None`` for a new run; ``"latest"`` to continue the newest run under
        ``directory`` (a new one if there is none); or the path of an earlier run directory.
        The stored config must equal ``config`` (fields named ``resume`` aside), else
        ``ValueError`` listing the differing fields. Defaults to ``config.resume`` when the
        config has such a field.

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
    ['config.json', 'metrics.jsonl'] False
    True
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
        previous: Path | None = None
        if resume is not None and str(resume) == "latest":
            runs = _runs_in(directory)
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
            return
        self.path, self.resumed = _new_run_path(directory, timestamp), False
        _write_atomic(self.path / "config.json", _dumps(stored_now, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, resumed={self.resumed})"

    def log(self, metrics: Mapping[str, Any]) -> None:
        """Appends ``metrics`` (a dict; arrays and NumPy scalars allowed) as one line of
        ``metrics.jsonl``."""
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
        line = _dumps(dict(metrics))
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(line + "\n")

    def read_metrics(self) -> list[dict]:
        """The lines of ``metrics.jsonl`` (``[]`` if none)."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_results(self, results: Mapping[str, Any]) -> Path:
        """Writes ``results.json`` atomically; returns its path."""
        if not isinstance(results, Mapping):
            raise TypeError(f"results must be a dict, got {type(results).__name__}")
        path = self.path / "results.json"
        _write_atomic(path, _dumps(dict(results), indent=2) + "\n")
        return path

    def write_summary(self, markdown: str) -> Path:
        """Writes ``summary.md`` atomically; returns its path."""
        if not isinstance(markdown, str):
            raise TypeError(f"markdown must be a str, got {type(markdown).__name__}")
        path = self.path / "summary.md"
        _write_atomic(path, markdown if markdown.endswith("\n") else markdown + "\n")
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
    stored = {k: v for k, v in stored.items() if k != "resume"}
    new = {k: v for k, v in new.items() if k != "resume"}
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

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     first = cached(Path(d) / "w", lambda: {"w": np.arange(3.0)})
    ...     again = cached(Path(d) / "w", lambda: 1 / 0)  # not recomputed
    ...     print(again["w"])
    [0. 1. 2.]
    """
    from jaxmtl.checkpoint import Checkpointer

    with Checkpointer(path, max_to_keep=1, async_save=False) as ckpt:
        if ckpt.latest_step() is None:
            ckpt.save(0, compute_fn())
            ckpt.wait()
        return ckpt.restore(ckpt.latest_step(), like)

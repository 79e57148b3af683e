"""``psrv experiment CONFIG.toml``: methods x grid (seeds x links x other settings), each one real
``psrv run`` (loopback) or ``psrv cluster run`` (shaped link, root), into one folder: per-run metrics,
``results.csv``, ``results.sqlite``, plots, tables and ``report.md`` (layout: docs/experiments.md).

Each run is a child process (``python -m psrv run ...``): Ctrl-C reaches it as it reaches a ``psrv
run``, a run that crashes never takes the experiment with it, and a re-run of the same command skips
the runs whose ``runs/<run_id>/summary.json`` says "status": "done" (resume). The tables follow the
LAQ paper's Tables 2-3 (Sun et al., NeurIPS 2019) and the SASG paper's Table II (Deng et al.,
arXiv:2112.04088): iterations, uploads, bits and bytes until a stopping rule (:mod:`psrv.stopping`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psrv.files import atomic_write_json

#: top-level keys of an experiment config
TOP_KEYS = {"name", "description", "out", "baseline", "run", "stop", "method", "grid"}
STOP_KEYS = {"loss_residual", "residual", "loss", "train_loss", "accuracy", "fstar"}
#: `psrv run` options an experiment sets itself (per run), never the config
RESERVED = {"out", "summary-json", "resume", "algorithm", "stop-at", "fstar", "help", "seed"}
LOOPBACK = "loopback"
RUN_SUMMARY = "run-summary.json"  # what the child psrv run wrote


class ConfigError(ValueError):
    """A config the experiment cannot run (one line naming the key)."""


@dataclass
class Method:
    label: str
    algorithm: str
    settings: dict[str, Any]  # psrv run options (dashed long names) on top of [run]


@dataclass
class Run:
    run_id: str
    label: str
    algorithm: str
    seed: int
    link: str
    grid: dict[str, Any]
    argv: list[str]  # "psrv", "run"|"cluster", ... (without --out and --fstar)
    stop: dict[str, float]
    fstar: float | str | None = None  # a number, "auto" (solved before the runs) or None

    def spec(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "label": self.label,
            "algorithm": self.algorithm,
            "seed": self.seed,
            "link": self.link,
            "grid": self.grid,
            "argv": self.argv,
            "stop": self.stop,
            "fstar": self.fstar if not isinstance(self.fstar, str) else None,
        }


@dataclass
class Experiment:
    name: str
    description: str
    out: Path
    baseline: str
    run: dict[str, Any]
    stop: dict[str, Any]
    methods: list[Method]
    grid: dict[str, list[Any]]
    raw: dict[str, Any] = field(default_factory=dict)  # the resolved config, as experiment.toml has it
    runs: list[Run] = field(default_factory=list)


# ---------------------------------------------------------------------------------- config
def _dash(key: str) -> str:
    return key.strip().replace("_", "-")


def _run_params(cluster: bool = False) -> dict[str, Any]:
    """Long option name (dashed) -> click Option of ``psrv run`` (or ``psrv cluster run``)."""
    if cluster:
        from psrv.cluster.cli import run as command
    else:
        from psrv.cli import run as command
    out = {}
    for p in command.params:
        for opt in [*p.opts, *getattr(p, "secondary_opts", [])]:
            if opt.startswith("--"):
                out[opt[2:]] = p
    return out


def _option_argv(key: str, value: Any, where: str, params: dict[str, Any]) -> list[str]:
    """argv of one ``psrv run`` option from a TOML value: a table -> repeated KEY=VALUE, a bool ->
    the flag (or nothing), a list (multiple options only) -> repeated, else ``--key value``."""
    name = _dash(key)
    if name in RESERVED:
        raise ConfigError(
            f"{where}.{key}: set by the experiment itself (use [[method]] algorithm, [grid] seeds, --out)"
        )
    p = params.get(name)
    if p is None:
        raise ConfigError(f"{where}.{key}: unknown key; psrv run has no --{name} (see psrv run --help)")
    flag = f"--{name}"
    if isinstance(value, dict):
        if not p.multiple:
            raise ConfigError(f"{where}.{key}: a table, but --{name} takes one value")
        return [a for k, v in value.items() for a in (flag, f"{k}={_text(v)}")]
    if isinstance(value, bool):
        if getattr(p, "is_flag", False):
            if p.secondary_opts and not value:
                return [p.secondary_opts[0]]
            if flag in p.secondary_opts:
                return [flag] if value else [p.opts[0]]
            return [flag] if value else []
        return [flag, str(value).lower()]
    if getattr(p, "is_flag", False):
        raise ConfigError(f"{where}.{key}: --{name} is a flag; use true or false")
    if isinstance(value, list):
        if not p.multiple:
            raise ConfigError(f"{where}.{key}: a list, but --{name} takes one value (lists to cross go in [grid])")
        return [a for v in value for a in (flag, _text(v))]
    if isinstance(value, (dict, datetime)):
        raise ConfigError(f"{where}.{key}: {type(value).__name__} is not a value of --{name}")
    return [flag, _text(value)]


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v)
    return str(v)


def slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "-", str(text)).strip("-") or "x"


def _csv_list(text: str | None, kind: type = str) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None


def load(
    path: str | Path,
    out: str | None = None,
    rounds: int | None = None,
    seeds: str | None = None,
    methods: str | None = None,
    links: str | None = None,
) -> Experiment:
    """Read and check ``path`` (flags override it); :class:`ConfigError` (one line) for anything
    wrong, before anything runs. The runs are expanded and each argv parsed by ``psrv run`` itself."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not TOML: {exc}") from None
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; known: {', '.join(sorted(TOP_KEYS))}")
    for key, kind in (("run", dict), ("stop", dict), ("grid", dict), ("method", list)):
        if key in raw and not isinstance(raw[key], kind):
            raise ConfigError(f"{path}: {key} must be a {'[table]' if kind is dict else '[[array of tables]]'}")
    for key in ("name", "description", "out", "baseline"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"{path}: {key} must be a string")
    if not raw.get("method"):
        raise ConfigError(f"{path}: no [[method]]; add at least one ([[method]] label = ... algorithm = ...)")
    run = dict(raw.get("run", {}))
    if rounds is not None:
        run["rounds"] = rounds
    stop = dict(raw.get("stop", {}))
    bad = sorted(set(stop) - STOP_KEYS)
    if bad:
        raise ConfigError(f"[stop].{bad[0]}: unknown key; known: loss_residual, loss, accuracy, fstar")
    grid = dict(raw.get("grid", {}))
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"[grid].{k}: must be a non-empty list")
    if seeds is not None:
        grid["seeds"] = _csv_list(seeds, int)
    if links is not None:
        grid["links"] = _csv_list(links)
    grid.setdefault("seeds", [0])
    grid.setdefault("links", [LOOPBACK])
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in grid["seeds"]):
        raise ConfigError("[grid].seeds: must be a list of integers")
    if not all(isinstance(s, str) for s in grid["links"]):
        raise ConfigError('[grid].links: must be a list of strings ("loopback", "10mbit", "10mbit/100mbit")')
    all_methods = []
    for i, m in enumerate(raw["method"], 1):
        if not isinstance(m, dict):
            raise ConfigError(f"[[method]] {i}: must be a table")
        for key in ("label", "algorithm"):
            if not isinstance(m.get(key), str) or not m[key]:
                raise ConfigError(f'[[method]] {i}: needs {key} = "..." (a string)')
        all_methods.append(
            Method(m["label"], m["algorithm"], {k: v for k, v in m.items() if k not in ("label", "algorithm")})
        )
    labels = [m.label for m in all_methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"[[method]]: labels must differ; {labels}")
    chosen = all_methods
    if methods is not None:
        wanted = _csv_list(methods) or []
        missing = [w for w in wanted if w not in labels]
        if missing:
            raise ConfigError(f"--methods: no [[method]] labelled {missing[0]!r}; labels: {', '.join(labels)}")
        chosen = [m for m in all_methods if m.label in wanted]
    exp = Experiment(
        name=raw.get("name", path.stem),
        description=raw.get("description", ""),
        out=Path(out or raw.get("out") or Path("psrv-exp") / path.stem),
        baseline=raw.get("baseline", chosen[0].label),
        run=run,
        stop=stop,
        methods=chosen,
        grid=grid,
    )
    if exp.baseline not in labels:
        raise ConfigError(f"baseline: no [[method]] labelled {exp.baseline!r}; labels: {', '.join(labels)}")
    exp.raw = {
        "name": exp.name,
        "description": exp.description,
        "out": str(exp.out),
        "baseline": exp.baseline,
        "run": run,
        "stop": stop,
        "grid": grid,
        "method": [{"label": m.label, "algorithm": m.algorithm, **m.settings} for m in chosen],
    }
    exp.runs = expand(exp)
    return exp


def _stop_targets(stop: dict[str, Any]) -> tuple[dict[str, float], float | str | None]:
    from psrv.stopping import ALIASES

    targets: dict[str, float] = {}
    for key, value in stop.items():
        if key == "fstar":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"[stop].{key}: must be a finite number")
        targets[ALIASES.get(key, key)] = float(value)
    fstar = stop.get("fstar")
    if fstar is not None and fstar != "auto" and (isinstance(fstar, bool) or not isinstance(fstar, int | float)):
        raise ConfigError('[stop].fstar: must be a number or "auto"')
    if "residual" in targets and fstar is None:
        raise ConfigError('[stop].loss_residual needs [stop].fstar (a number, or "auto" for logreg/linreg)')
    return targets, fstar


def expand(exp: Experiment) -> list[Run]:
    """Every (method, grid point) as a :class:`Run`, its argv checked by the command's own parser."""
    import itertools

    import click

    from psrv.options import pop_data
    from psrv.stopping import CONVEX_TASKS

    targets, fstar = _stop_targets(exp.stop)
    other = {k: v for k, v in exp.grid.items() if k not in ("seeds", "links")}
    runs: list[Run] = []
    params = {False: _run_params(False)}
    for m in exp.methods:
        for seed, link, *values in itertools.product(exp.grid["seeds"], exp.grid["links"], *other.values()):
            point = dict(zip(other, values, strict=True))
            cluster = link != LOOPBACK
            if cluster and cluster not in params:
                params[cluster] = _run_params(True)
            p = params[cluster]
            args: list[str] = []
            tables: dict[str, dict[str, Any]] = {"option": {}, "task-option": {}}  # -o / -t: the method's on top
            for where, settings in (("[run]", exp.run), (f"[[method]] {m.label}", m.settings), ("[grid]", point)):
                for key, value in settings.items():
                    if _dash(key) in tables:
                        if not isinstance(value, dict):
                            raise ConfigError(f"{where}.{key}: must be a table, e.g. {key} = {{ name = 1 }}")
                        tables[_dash(key)].update(value)
                        continue
                    if cluster and where == "[run]" and _dash(key) not in p and _dash(key) in params[False]:
                        continue  # psrv run's own (eval_every, register_timeout): psrv cluster run has none
                    args += _option_argv(key, value, where, p)
            for key, table in tables.items():
                args += _option_argv(key, table, "[run]", p) if table else []
            if cluster:
                if targets:
                    raise ConfigError(f"[grid].links: {link!r} runs psrv cluster run, which has no stopping rules; "
                                      "drop [stop] or use links = [\"loopback\"]")  # fmt: skip
                argv = ["psrv", "cluster", "run", "--algorithm", m.algorithm, "--seed", str(seed), *args,
                        "--rate", link]  # fmt: skip
            else:
                argv = ["psrv", "run", "--algorithm", m.algorithm, "--seed", str(seed), *args]
                for key, value in targets.items():
                    argv += ["--stop-at", f"{key}={value!r}"]
            run_id = f"{slug(m.label)}__seed{seed}__{slug(link)}" + "".join(
                f"__{slug(k)}={slug(v)}" for k, v in point.items()
            )
            command = _command(cluster)
            try:
                with click.Context(command) as ctx:  # what psrv run would say, before anything runs
                    command.parse_args(ctx, list(argv[3:] if cluster else argv[2:]))
                    kw = dict(ctx.params)
                task = _job_config(kw, pop_data(kw)).task  # and its job's options (-o, -t, --compressor, ...)
            except click.ClickException as exc:
                raise ConfigError(f"run {run_id}: {exc.format_message()}") from None
            if fstar == "auto" and "residual" in targets and task not in CONVEX_TASKS:
                raise ConfigError(
                    f'[stop].fstar: "auto" is solved only for the convex tasks ({", ".join(CONVEX_TASKS)}); '
                    f"task {task!r} needs a number (fstar = F)"
                )
            runs.append(Run(run_id, m.label, m.algorithm, seed, link, point, argv, targets,
                            fstar if "residual" in targets else None))  # fmt: skip
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise ConfigError("two runs would share a folder (labels that differ only in punctuation?)")
    return runs


def _command(cluster: bool) -> Any:
    if cluster:
        from psrv.cluster.cli import run
    else:
        from psrv.cli import run
    return run


# ---------------------------------------------------------------------------------- f*
def _fstar_key(run: Run) -> str:
    """What f* depends on: the task, its options and the data split (the seed splits the data)."""
    keep = {"--task", "--data", "--split", "--test-fraction", "--regression", "--l2", "--task-option", "--seed"}
    args, key = run.argv, []
    for i, a in enumerate(args):
        if a in keep:
            nxt = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
            key.append(f"{a}={nxt}")
    return " ".join(sorted(key))


def resolve_fstar(exp: Experiment, echo: Any = print) -> None:
    """Each run's ``fstar = "auto"`` as a number: solved once per task/data/seed and cached in
    ``EXP/fstar.json`` (a re-run reuses it)."""
    need = [r for r in exp.runs if r.fstar == "auto"]
    if not need:
        return
    import click

    from psrv.options import pop_data
    from psrv.stopping import StopRuleError, solve_fstar

    cache_path = exp.out / "fstar.json"
    cache: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        cache = dict(json.loads(cache_path.read_text()))
    command = _command(False)
    for r in need:
        key = _fstar_key(r)
        if key not in cache:
            with click.Context(command) as ctx:
                command.parse_args(ctx, list(r.argv[2:]))
                kw = dict(ctx.params)
            try:
                dc = pop_data(kw)
                config = _job_config(kw, dc)
                started = time.monotonic()
                cache[key] = solve_fstar(config.task, dict(config.task_options), dc)
            except click.ClickException as exc:
                raise ConfigError(f"run {r.run_id}: {exc.format_message()}") from None
            except StopRuleError as exc:
                raise ConfigError(f"[stop].fstar: {exc}") from None
            took = time.monotonic() - started
            echo(f"f* = {cache[key]:.12g} for {r.run_id} ({took:.1f} s, L-BFGS; cached in {cache_path})")
            exp.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache_path, cache)
        r.fstar = cache[key]


def _job_config(kw: dict[str, Any], dc: Any) -> Any:
    from psrv.options import jobs_from_cli, pop_device

    """The job's server configuration (its task and task options, defaults resolved) from the
    parsed ``psrv run`` keyword arguments (the rest of them is ignored)."""
    kw = dict(kw)
    pop_device(kw)
    return jobs_from_cli(kw, dc.data)[0].server_config()


# ---------------------------------------------------------------------------------- runs
def finished(folder: Path) -> dict[str, Any] | None:
    """The run's summary when it finished ("status": "done"), else None."""
    try:
        s = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and s.get("status") == "done" else None


def child_argv(run: Run, folder: Path, tensorboard: str | None) -> list[str]:
    args = [sys.executable, "-m", "psrv", *run.argv[1:]]
    if run.link == LOOPBACK:  # its summary goes to RUN_SUMMARY: summary.json is the experiment's, written last
        args += ["--out", str(folder), "--summary-json", str(folder / RUN_SUMMARY)]
        if run.fstar is not None:
            args += ["--fstar", repr(float(run.fstar)) if not isinstance(run.fstar, str) else run.fstar]
        if tensorboard is not None:
            args += ["--tensorboard", str(Path(tensorboard) / run.run_id)]
    else:
        args += ["--out", str(folder / "cluster")]
    return args


def _adopt_cluster(run: Run, folder: Path) -> dict[str, Any]:
    """``psrv cluster run``'s outputs in the per-run layout: <algorithm>/metrics.jsonl, and the summary
    to write, "status": "done" (it has no stopping rules: "stopped_by": "rounds")."""
    src = folder / "cluster"
    result = json.loads((src / "summary.json").read_text())
    (folder / run.algorithm).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "metrics.jsonl", folder / run.algorithm / "metrics.jsonl")
    # the server's summary (rounds, uploads, bits, bytes, final loss) at the top, as psrv run has it;
    # the cluster's own (links, hosts' wire counters, timing) under "cluster"
    summary = {**result.get("server", {}), "cluster": {k: v for k, v in result.items() if k != "server"}}
    summary.setdefault("algorithm", run.algorithm)
    summary["worker_exit_codes"] = result.get("worker_exit_codes")
    summary.update(status="done", stopped_by="rounds", stop_round=None)
    return summary


def execute(exp: Experiment, tensorboard: str | None = None, echo: Any = print) -> dict[str, list[str]]:
    """Run every unfinished run in order (a finished one is skipped); returns {"done", "skipped",
    "failed"} run ids. Ctrl-C: the running child is stopped, what finished is kept (the results are
    written), and KeyboardInterrupt is raised again."""
    resolve_fstar(exp, echo)  # a task that has no f* fails here, before anything runs
    exp.out.mkdir(parents=True, exist_ok=True)
    from psrv.files import atomic_write_text

    atomic_write_text(exp.out / "experiment.toml", to_toml(exp.raw))
    status: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}
    n = len(exp.runs)
    try:
        for i, run in enumerate(exp.runs, 1):
            folder = exp.out / "runs" / run.run_id
            if finished(folder) is not None:
                status["skipped"].append(run.run_id)
                echo(f"[{i}/{n}] {run.run_id}: finished before, skipped (resume)")
                continue
            if folder.exists():
                shutil.rmtree(folder)  # an unfinished run is redone from scratch
            folder.mkdir(parents=True)
            atomic_write_json(folder / "spec.json", run.spec())
            started = time.monotonic()
            argv = child_argv(run, folder, tensorboard)
            with open(folder / "run.log", "w") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
                try:
                    rc = proc.wait()
                except KeyboardInterrupt:  # the child got the terminal's SIGINT too; give it time to stop
                    with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
                        proc.send_signal(signal.SIGINT)
                        proc.wait(timeout=30)
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                    raise
            wall = time.monotonic() - started
            summary = None
            with contextlib.suppress(OSError, ValueError, AttributeError):
                summary = _adopt_cluster(run, folder) if run.link != LOOPBACK else _read(folder / RUN_SUMMARY)
            if rc != 0 or not isinstance(summary, dict) or summary.get("status") != "done":
                status["failed"].append(run.run_id)
                echo(f"[{i}/{n}] {run.run_id}: FAILED (exit {rc}): {_why(folder)}")
                continue
            summary.update(run_id=run.run_id, finished_at=_now(), process_wall_s=round(wall, 3))
            atomic_write_json(folder / "summary.json", summary)  # "done": written last, whole
            stop = "" if summary.get("stopped_by") in (None, "rounds") else (
                f", stopped by {summary['stopped_by']} at round {summary.get('stop_round')}")  # fmt: skip
            status["done"].append(run.run_id)
            echo(f"[{i}/{n}] {run.run_id}: done in {wall:.1f} s ({summary.get('rounds')} rounds{stop})")
            write_results(exp.out, exp.name)
    finally:
        write_results(exp.out, exp.name)
    return status


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _why(folder: Path) -> str:
    for name in ("summary.json", RUN_SUMMARY):
        with contextlib.suppress(OSError, ValueError):
            s = _read(folder / name)
            if isinstance(s, dict) and s.get("error"):
                return str(s["error"])[:300]
    with contextlib.suppress(OSError):
        lines = [x for x in (folder / "run.log").read_text(errors="replace").splitlines() if x.strip()]
        if lines:
            return lines[-1][:300]
    return f"see {folder / 'run.log'}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------- results
COLUMNS = [
    "experiment", "run_id", "finished_at", "label", "algorithm", "seed", "link", "status", "rounds", "stopped_by",
    "stop_round", "uploads", "payload_bits", "bytes_up", "bytes_down", "final_loss", "fstar", "final_residual",
    "accuracy", "train_accuracy", "wall_time", "process_wall_s",
]  # fmt: skip


def rows(exp_dir: Path, name: str) -> list[dict[str, Any]]:
    """One flat row per finished run (spec + summary numbers), in run_id order."""
    out = []
    for folder in sorted((exp_dir / "runs").glob("*")):
        summary = finished(folder)
        if summary is None:
            continue
        try:
            spec = json.loads((folder / "spec.json").read_text())
        except (OSError, ValueError):
            continue
        row: dict[str, Any] = {k: spec.get(k) for k in ("run_id", "label", "algorithm", "seed", "link")}
        row["experiment"] = name
        row["run_id"] = folder.name
        row["finished_at"] = summary.get("finished_at") or datetime.fromtimestamp(
            (folder / "summary.json").stat().st_mtime, UTC
        ).isoformat(timespec="seconds")
        for k in COLUMNS:
            if k not in row and k in summary:
                row[k] = summary[k]
        fstar = summary.get("fstar", spec.get("fstar"))
        row["fstar"] = fstar
        loss = summary.get("final_loss")
        row["final_residual"] = (
            loss - fstar if isinstance(loss, int | float) and isinstance(fstar, int | float) else None
        )
        for k, v in (spec.get("grid") or {}).items():
            row[f"grid.{k}"] = v
        totals = (summary.get("cluster") or {}).get("totals") or {}
        for k in ("wire_bytes_up", "wire_bytes_down"):  # a shaped link: bytes on the wire, headers included
            if k in totals:
                row[k] = totals[k]
        out.append(row)
    return out


def write_results(exp_dir: Path, name: str) -> list[dict[str, Any]]:
    """``results.csv`` (rewritten atomically) and ``results.sqlite`` (table ``runs``, upserted in one
    transaction; key experiment + run_id) from every finished run."""
    from psrv.files import atomic_write_text

    table = rows(exp_dir, name)
    extra = sorted({k for r in table for k in r} - set(COLUMNS))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*COLUMNS, *extra], extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow({k: "" if v is None else v for k, v in r.items()})
    atomic_write_text(exp_dir / "results.csv", buf.getvalue())
    db = sqlite3.connect(exp_dir / "results.sqlite")
    try:
        with db:  # one transaction: all the rows or none
            cols = ", ".join(f'"{c}"' for c in COLUMNS[3:])
            db.execute(
                f"CREATE TABLE IF NOT EXISTS runs (experiment TEXT NOT NULL, run_id TEXT NOT NULL, finished_at TEXT, "
                f"{cols}, grid TEXT, summary TEXT, PRIMARY KEY (experiment, run_id))"
            )
            for r in table:
                summary = json.loads((exp_dir / "runs" / r["run_id"] / "summary.json").read_text())
                grid = {k[5:]: v for k, v in r.items() if k.startswith("grid.")}
                values = [r.get(c) for c in COLUMNS] + [json.dumps(grid), json.dumps(summary)]
                db.execute(
                    f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * len(values))})",
                    [v if v is None or isinstance(v, int | float | str) else json.dumps(v) for v in values],
                )
    finally:
        db.close()
    return table


def unfinished(exp_dir: Path) -> list[tuple[str, str]]:
    """(run_id, why) of every run folder that has not finished."""
    out = []
    for folder in sorted((exp_dir / "runs").glob("*")):
        if folder.is_dir() and finished(folder) is None:
            out.append((folder.name, _why(folder)))
    return out


# ---------------------------------------------------------------------------------- report
def to_toml(data: dict[str, Any]) -> str:
    """The resolved config as TOML (a small writer: strings, numbers, bools, lists, tables)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{key(k)} = {val(x)}" for k, x in v.items()) + " }"
        return json.dumps(str(v))

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)

    lines = [f"{k} = {val(data[k])}" for k in ("name", "description", "out", "baseline") if k in data]
    for table in ("run", "stop", "grid"):
        if data.get(table):
            lines += ["", f"[{table}]", *(f"{key(k)} = {val(v)}" for k, v in data[table].items())]
    for m in data.get("method", []):
        lines += ["", "[[method]]", *(f"{key(k)} = {val(v)}" for k, v in m.items())]
    return "\n".join(lines) + "\n"


def render_report(exp_dir: str | Path, echo: Any = print) -> Path:
    """Plots and tables (:mod:`psrv.figures`), results.csv/sqlite and ``report.md``, from the saved
    runs only (nothing reruns)."""
    exp_dir = Path(exp_dir)
    try:
        raw = tomllib.loads((exp_dir / "experiment.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{exp_dir}: not an experiment folder (no readable experiment.toml: {exc})") from None
    name = raw.get("name", exp_dir.name)
    write_results(exp_dir, name)
    from psrv import figures

    images = [Path(p) for p in figures.render(exp_dir) if str(p).endswith(".png")]
    tables = figures.tables(exp_dir)
    parts = [f"# {name}", ""]
    if raw.get("description"):
        parts += [raw["description"], ""]
    parts += ["## Configuration", "", "```toml", to_toml(raw).rstrip(), "```", ""]
    parts += ["## Tables", ""]
    for title, md in tables.items():
        parts += [f"### {title}", "", md.rstrip(), ""]
    if images:
        parts += ["## Plots", ""]
        for img in images:
            rel = os.path.relpath(img, exp_dir)
            parts += [f"![{Path(rel).stem}]({rel})", ""]
    missing = unfinished(exp_dir)
    if missing:
        parts += ["## Unfinished runs", ""] + [f"- {rid}: {why}" for rid, why in missing] + [""]
    from psrv.files import atomic_write_text

    return atomic_write_text(exp_dir / "report.md", "\n".join(parts))

"""Cohorts: many slides, resumable, failure-isolated, in-process or on dask.distributed.

One task per slide. Each slide's state lives in ``OUT/state/<id>.json`` (written atomically: temporary
file, then rename) and is all that `status` reads. An ``O_EXCL`` lock file per slide keeps two runs from
writing the same output; a lock whose process is dead (same host) is reclaimed. Outputs resume by chunk,
so a retried task continues where the lost one stopped.

Execution:

* default: in-process, one slide after another, each in a child process so that a reader that crashes
  the interpreter (segfault, abort) fails that slide only;
* ``workers=N``: a dask ``LocalCluster`` of N single-threaded worker processes;
* ``scheduler=ADDRESS``: an existing dask.distributed scheduler (start workers with ``dask worker``,
  dask-jobqueue on SLURM, or dask-kubernetes); GPU workers should declare ``--resources GPU=1`` and
  tasks then ask for one GPU each.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any

from .errors import HistoSGEError, InputNotFoundError, NoSlidesError, OutputLockedError, UsageError, check_range
from .lock import OutputLock
from .owned import GENERATOR

#: Exit codes of `batch` (their meanings are in errors.EXIT_CODES, the one table).
EXIT_ALL_OK = 0
EXIT_PARTIAL = 10
EXIT_ALL_FAILED = 11
EXIT_NO_SLIDES = NoSlidesError.exit_code
EXIT_LOCKED = OutputLockedError.exit_code
EXIT_INTERRUPTED = 130

SLIDE_SUFFIXES = {
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".dcm",
    ".bif",
    ".vms",
    ".svslide",
    ".jpg",
    ".jpeg",
    ".png",
}
_BAD_ID_CHARS = set('/\\\x00:*?"<>|')


@dataclass
class SlideJob:
    """One slide of a cohort: where it is, its id (a safe file name), and per-slide options."""

    slide: str
    id: str
    mpp: float | None = None
    tissue_mask: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def out_path(self, out: str | Path) -> str:
        return f"{str(out).rstrip('/')}/{self.id}.zarr"


def _check_id(job_id: str) -> str | None:
    if not job_id or job_id in (".", "..") or job_id.startswith(".") or any(c in _BAD_ID_CHARS for c in job_id):
        return "not a safe file name (no '/', '\\\\', ':', NUL, leading '.', or empty id)"
    if len(job_id) > 200:
        return "longer than 200 characters"
    return None


def _within(path: Path, roots: list[Path]) -> bool:
    rp = path.resolve()
    return any(rp == r or r in rp.parents for r in roots)


class _BadRow(Exception):
    """One manifest row's problem; rows are checked on, so that every bad row is reported at once."""


@dataclass(frozen=True)
class _ManifestPaths:
    """How a manifest's local paths resolve: relative to its folder, and (when given) under ``roots``."""

    base: Path
    roots: list[Path]

    def place(self, value: str, n: int, what: str) -> str:
        """A URL as given; a local path resolved, and refused outside ``roots``."""
        if "://" in value:
            return value
        p = Path(value)
        p = p if p.is_absolute() else self.base / p
        if self.roots and not _within(p, self.roots):
            raise _BadRow(f"row {n}: {what} {value} is outside --slides-under ({', '.join(map(str, self.roots))})")
        return str(p)


def _manifest_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise InputNotFoundError(f"{path}: manifest not found; check the path")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise UsageError(f"{path}: the manifest contains NUL bytes; it is not a text CSV")
    return raw


def _manifest_rows(path: Path, raw: bytes) -> csv.DictReader[str]:
    """The manifest's rows, once its text and its header are checked."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: the manifest is not UTF-8 text; save it as a UTF-8 CSV") from None
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or "slide" not in reader.fieldnames:
        raise UsageError(f"{path}: needs a 'slide' column (columns: {reader.fieldnames})")
    return reader


def _cell(row: dict[str, Any], column: str) -> str:
    return (row.get(column) or "").strip()


def _manifest_mpp(row: dict[str, Any], n: int) -> float | None:
    import math

    from .infer import OPTION_RANGES

    if not _cell(row, "mpp"):
        return None
    lo, hi = OPTION_RANGES["mpp"]
    try:
        mpp = float(row["mpp"])
    except ValueError:
        mpp = math.nan
    if not (math.isfinite(mpp) and lo <= mpp <= hi):
        raise _BadRow(f"row {n}: mpp {row['mpp']!r} is not a pixel size between {lo:g} and {hi:g} µm/px")
    return mpp


#: Manifest columns read into a SlideJob's fields; any other column is carried into the summary.
_MANIFEST_FIELDS = ("slide", "id", "mpp", "tissue_mask")


def _manifest_job(row: dict[str, Any], n: int, paths: _ManifestPaths) -> SlideJob:
    """Row ``n`` of a manifest as a job; _BadRow names its first problem."""
    slide = _cell(row, "slide")
    if not slide:
        raise _BadRow(f"row {n}: empty slide")
    slide = paths.place(slide, n, "slide")
    url_problem = _url_problem(slide)
    if url_problem:
        raise _BadRow(f"row {n}: {url_problem}")
    job_id = _cell(row, "id") or _default_id(slide)
    why = _check_id(job_id)
    if why:
        raise _BadRow(f"row {n}: id {job_id!r} is {why}")
    mpp = _manifest_mpp(row, n)
    mask = _cell(row, "tissue_mask") or None
    if mask:
        mask = paths.place(mask, n, "tissue_mask")
    extra = {k: v for k, v in row.items() if k not in _MANIFEST_FIELDS and k is not None}
    return SlideJob(slide, job_id, mpp, mask, extra)


def read_manifest(path: str | Path, *, slides_under: Iterable[str | Path] = ()) -> list[SlideJob]:
    """A CSV with a ``slide`` column (absolute path, path relative to the manifest's folder, or URL) and
    optional ``id``, ``mpp``, ``tissue_mask``; other columns are carried into the summary. Every problem is
    reported at once, before any slide is touched.

    ``slides_under``: when given (service deployments), every local slide and mask must lie under one of
    these folders."""
    path = Path(path)
    raw = _manifest_bytes(path)
    paths = _ManifestPaths(path.resolve().parent, [Path(r).resolve() for r in slides_under])
    jobs, problems = [], []
    for n, row in enumerate(_manifest_rows(path, raw), start=2):
        try:
            jobs.append(_manifest_job(row, n, paths))
        except _BadRow as exc:
            problems.append(str(exc))
    problems += _duplicates(jobs)
    if problems:
        raise UsageError(f"{path}: {len(problems)} bad row(s), nothing was run: " + "; ".join(problems))
    if not jobs:
        raise NoSlidesError(f"{path}: the manifest lists no slides (a header and no rows); add one row per slide")
    return jobs


def _duplicates(jobs: list[SlideJob]) -> list[str]:
    seen: dict[str, str] = {}
    seen_slides: dict[str, str] = {}
    out = []
    for j in jobs:
        if j.id in seen:
            out.append(f"duplicate id {j.id!r} ({seen[j.id]} and {j.slide}); set distinct ids")
        seen[j.id] = j.slide
        if j.slide in seen_slides:
            out.append(f"slide {j.slide} listed twice (ids {seen_slides[j.slide]!r} and {j.id!r})")
        seen_slides[j.slide] = j.id
    return out


def _has_glob(item: str) -> bool:
    return any(c in item for c in "*?[")


def _folder_slides(folder: Path) -> list[SlideJob]:
    """The slides in a folder: its slide files, and its sub-folders that hold one DICOM series each. A
    folder that is itself one DICOM series is one slide."""
    from .slide import dicom_series_folder

    if dicom_series_folder(folder):
        return [SlideJob(str(folder), folder.name)]
    jobs = []
    for f in sorted(folder.iterdir()):
        if f.is_dir():
            # a sub-folder of DICOM files is a slide; one that mixes series fails with its reason, never
            # silently disappears from the cohort
            if dicom_series_folder(f) or any(p.suffix.lower() == ".dcm" for p in f.iterdir()):
                jobs.append(SlideJob(str(f), f.name))
        elif f.suffix.lower() in SLIDE_SUFFIXES:
            jobs.append(SlideJob(str(f), f.stem))
    if not jobs:
        raise NoSlidesError(
            f"{folder}: holds no slides (files ending in {', '.join(sorted(SLIDE_SUFFIXES))}, or DICOM series "
            "folders); check the folder"
        )
    return jobs


def _glob_jobs(item: str, slides_under: Iterable[str | Path]) -> list[SlideJob]:
    matches = sorted(glob(item))
    if not matches:
        raise NoSlidesError(f"{item!r} matched no file; check the pattern (quote it so the shell keeps it)")
    jobs: list[SlideJob] = []
    for m in matches:
        mp = Path(m)
        if mp.suffix.lower() == ".csv":
            jobs += read_manifest(mp, slides_under=slides_under)
        elif mp.is_dir():
            jobs += _folder_slides(mp)
        else:
            jobs.append(SlideJob(m, mp.stem))
    return jobs


def _default_id(slide: str) -> str:
    """A slide's id when none is given: its file name without the suffix (a URL's object name)."""
    from .remote import SlideURL, is_url

    return SlideURL(slide).stem if is_url(slide) else Path(slide.rstrip("/")).stem


def _input_jobs(item: str, slides_under: Iterable[str | Path]) -> list[SlideJob]:
    """The slides one input names: a manifest, a folder, a glob, a slide, or a slide's URL (s3://, gs://)."""
    from .remote import is_url

    if is_url(item):
        problem = _url_problem(item)  # before any message names it: a URL may hold credentials
        if problem:
            raise UsageError(f"bad inputs, nothing was run: {problem}")
        if "*" in item:
            raise UsageError(f"{item}: wildcards in URLs are not expanded; list the slides in a CSV manifest")
        return [SlideJob(item, _default_id(item))]
    p = Path(item)
    if p.suffix.lower() == ".csv" and not _has_glob(item):
        return read_manifest(p, slides_under=slides_under)
    if p.is_dir() and p.suffix.lower() != ".svs":
        return _folder_slides(p)
    if _has_glob(item) and not p.exists():
        return _glob_jobs(item, slides_under)
    return [SlideJob(item, p.stem if p.suffix else p.name)]


def _url_problem(slide: str) -> str | None:
    """Why a slide URL cannot be used (credentials in it, unknown protocol, backend not installed), said
    without the URL's secrets; None for a local path or a usable URL."""
    from .remote import is_url, parse_slide_url

    if not is_url(slide) or slide.lower().startswith("file://"):
        return None
    try:
        parse_slide_url(slide)
    except UsageError as exc:
        return str(exc)
    return None


def _input_problems(jobs: list[SlideJob], slides_under: Iterable[str | Path]) -> list[str]:
    problems = [f"id {j.id!r} ({j.slide}) is {why}" for j in jobs if (why := _check_id(j.id))]
    problems += _duplicates(jobs)
    roots = [Path(r).resolve() for r in slides_under]
    if roots:  # every local slide, however it was named (path, glob, folder, manifest), symlinks resolved
        problems += [
            f"{j.slide} is outside --slides-under"
            for j in jobs
            if "://" not in j.slide and not _within(Path(j.slide), roots)
        ]
    return problems


def collect_jobs(inputs: list[str], *, slides_under: Iterable[str | Path] = ()) -> list[SlideJob]:
    """Slides from paths, globs, folders (their slide files and DICOM series folders) and CSV manifests.

    A glob that matches nothing raises NoSlidesError (exit 12) naming it: a typo must not pass for an
    empty cohort."""
    jobs: list[SlideJob] = []
    for item in inputs:
        jobs += _input_jobs(item, slides_under)
    problems = _input_problems(jobs, slides_under)
    if problems:
        raise UsageError("bad inputs, nothing was run: " + "; ".join(problems))
    if not jobs:
        raise NoSlidesError(
            f"no slides in {' '.join(inputs) or 'the inputs'}; give slide files, folders, or a manifest"
        )
    return jobs


# -- state and locks ------------------------------------------------------------------------------
def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def state_path(out: Path, job_id: str) -> Path:
    return out / "state" / f"{job_id}.json"


def run_dir_for(out: str | Path, state_dir: str | Path | None = None) -> Path:
    """Where a run keeps state, locks and summaries: the output folder itself, or for an object-store
    output (s3://, gs://, ...) a local folder (``state_dir``, default under ~/.cache/wsi-histosge/runs)."""
    if state_dir is not None:
        return Path(state_dir)
    if "://" not in str(out):
        return Path(out)
    import hashlib

    key = hashlib.sha256(str(out).rstrip("/").encode()).hexdigest()[:16]
    return Path(os.environ.get("WSI_HISTOSGE_CACHE", Path.home() / ".cache" / "wsi-histosge")) / "runs" / key


def read_states(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every slide's state in a run folder; InputNotFoundError when the folder is not a batch output."""
    folder = Path(run_dir) / "state"
    if not Path(run_dir).exists():
        raise InputNotFoundError(f"{run_dir}: no such folder; give the --out folder of a `batch` run")
    if not folder.is_dir():
        raise InputNotFoundError(f"{run_dir}: not a `batch` output (no state/ folder inside); check the path")
    states = []
    for p in sorted(folder.glob("*.json")):
        state = read_state(p)
        states.append(state or {"id": p.stem, "status": "unknown", "error": "unreadable state file"})
    return states


def read_state(path: Path) -> dict[str, Any]:
    """A slide's state, or {} when absent; an unreadable or truncated state file (a crash while writing,
    a full disk) reads as absent, so the slide is simply run again."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class SlideLock(OutputLock):
    """The lock of one slide of a run: ``RUN/state/<id>.lock``."""

    def __init__(self, out: Path, job_id: str) -> None:
        super().__init__(Path(out) / "state" / f"{job_id}.lock")


# -- one slide ------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """What every slide of the run shares (picklable, sent to workers)."""

    def run_dir(self) -> Path:
        return run_dir_for(self.out, self.state_dir)

    out: str
    options: dict[str, Any] = field(default_factory=dict)  # InferOptions fields
    retry_failed: bool = False
    state_dir: str | None = None  # local folder for state/locks when `out` is an object-store URL
    torch_threads: int | None = None  # intra-op threads per slide (set so workers x threads = cores)


def run_slide(job: SlideJob, cfg: RunConfig) -> dict[str, Any]:
    """Infer one slide under its lock, recording state; never raises for a slide's own failure."""
    from .infer import InferOptions, infer_slide

    out = cfg.out
    run = cfg.run_dir()
    spath = state_path(run, job.id)
    spath.parent.mkdir(parents=True, exist_ok=True)
    base = {
        "id": job.id,
        "slide": job.slide,
        "output": job.out_path(out),
        **job.extra,
        "options_key": _options_key(job, cfg),
    }
    skipped = _skip(job, cfg)
    if skipped is not None:
        return skipped
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    lock = SlideLock(run, job.id)
    if not lock.acquire():
        return {**base, "status": "locked", "error": f"another run is processing it ({lock.describe_holder()})"}
    started = time.time()
    previous = read_state(spath)
    _atomic_json(
        spath, {**base, "status": "running", "pid": os.getpid(), "host": socket.gethostname(), "started": started}
    )
    try:
        opts = InferOptions(
            **{
                **cfg.options,
                "mpp": job.mpp or cfg.options.get("mpp"),
                "tissue_mask": job.tissue_mask or cfg.options.get("tissue_mask"),
            }
        )
        result = infer_slide(job.slide, job.out_path(out), opts)
        state = {
            **base,
            "status": "done",
            "result": result.status,
            "spots": result.spots,
            "tiles": result.tiles,
            "tissue_area_mm2": result.tissue_area_mm2,
            "spots_per_s": result.spots_per_s,
            **_flag_counts(result.trust),
            # a slide read in place from an object store: what the run fetched of it
            **({"bytes_read": result.bytes_read, "file_size": result.file_size} if result.file_size else {}),
            "seconds": time.time() - started,
            "error": "",
        }
        if (
            result.status == "already-complete"
            and previous.get("status") == "done"
            and previous.get("options_key") == base["options_key"]
        ):  # nothing was computed now: the row keeps the run that made the cube (its time, tiles, reads)
            state.update({k: previous[k] for k in ("tiles", "spots_per_s", "seconds", "bytes_read") if k in previous})
    except OutputLockedError as exc:  # a plain `infer` is writing this output
        state = {**base, "status": "locked", "error": str(exc), "seconds": time.time() - started}
    except HistoSGEError as exc:
        state = {
            **base,
            "status": "failed",
            "error": str(exc),
            "exit_code": exc.exit_code,
            "seconds": time.time() - started,
        }
    except Exception as exc:
        state = {**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "seconds": time.time() - started}
    finally:
        lock.release()
    _atomic_json(spath, state)
    return state


def _options_key(job: SlideJob, cfg: RunConfig) -> str:
    """What a slide's result depends on besides the slide: a failure under other options is not repeated."""
    import hashlib

    blob = json.dumps([cfg.options, job.slide, job.mpp, job.tissue_mask], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _skip(job: SlideJob, cfg: RunConfig) -> dict[str, Any] | None:
    """The previous state, marked skipped, when the slide failed before with the same options and retries
    were not asked for (a corrected option or manifest row runs it again)."""
    previous = read_state(state_path(cfg.run_dir(), job.id))
    if previous.get("status") != "failed" or cfg.retry_failed:
        return None
    if previous.get("options_key") not in (None, _options_key(job, cfg)):
        return None
    return {
        **previous,
        "error": f"{previous.get('error', '')} (from an earlier run; pass --retry-failed to try again)",
        "skipped": "failed before; pass --retry-failed to try again",
    }


def _child_main(job: SlideJob, cfg: RunConfig, conn: Any) -> None:
    conn.send(run_slide(job, cfg))
    conn.close()


def _run_slide_in_child(job: SlideJob, cfg: RunConfig) -> dict[str, Any]:
    """run_slide in a spawned child process; a crash (signal) marks the slide failed instead of killing us."""
    import multiprocessing as mp

    skipped = _skip(job, cfg)
    if skipped is not None:
        return skipped

    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(job, cfg, child_end), name=f"wsi-histosge-{job.id}")
    proc.start()
    child_end.close()
    out = cfg.out
    run = cfg.run_dir()
    try:
        proc.join()
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM from a scheduler): stop the slide, keep its chunks, say so.
        proc.terminate()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        SlideLock(run, job.id).release(force=True)
        _atomic_json(
            state_path(run, job.id),
            {
                "id": job.id,
                "slide": job.slide,
                "output": job.out_path(out),
                **job.extra,
                "status": "interrupted",
                "error": "interrupted; rerun to resume",
            },
        )
        raise
    state = read_state(state_path(run, job.id))
    if parent_end.poll():
        try:
            return dict(parent_end.recv())  # what run_slide returned (also "locked", which writes no state)
        except (EOFError, OSError):
            pass
    if proc.exitcode and proc.exitcode != 0 and state.get("status") not in ("done", "failed"):
        code = proc.exitcode
        why = f"crashed, signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"crashed, exit code {code}"
        state = {
            "id": job.id,
            "slide": job.slide,
            "output": job.out_path(out),
            **job.extra,
            "status": "failed",
            "error": why,
        }
        SlideLock(run, job.id).release(force=True)
        _atomic_json(state_path(run, job.id), state)
    return state


# -- a run ------------------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    rows: list[dict[str, Any]]
    seconds: float
    exit_code: int

    @property
    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for r in self.rows:
            c[r.get("status", "unknown")] = c.get(r.get("status", "unknown"), 0) + 1
        return c


def run_batch(
    jobs: list[SlideJob],
    cfg: RunConfig,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    retries: int = 2,
    isolate: bool = True,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    report: bool = True,
    report_genes: list[str] | None = None,
) -> BatchSummary:
    """Run every job; write summary.csv, summary.json and (unless not ``report``) report.html with maps of
    ``report_genes`` (see :mod:`.report`) in ``cfg.out``; return the summary.

    Options are checked (UsageError) before anything is created."""
    validate_run(cfg, workers=workers, retries=retries)
    out = cfg.run_dir()
    from .owned import require_replaceable

    require_replaceable([out / "summary.csv", out / "summary.json"], "batch's summary")
    if report:
        require_replaceable([out / "report.html"], "batch's report")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        summary = _run_all(
            jobs, cfg, out, workers=workers, scheduler=scheduler, retries=retries, isolate=isolate, on_update=on_update
        )
    except HistoSGEError:
        if created and not any(out.iterdir()):  # e.g. the scheduler is unreachable: leave no empty folder
            out.rmdir()
        raise
    if report and summary.rows:
        from .report import write_batch_report

        write_batch_report(
            out,
            summary.rows,
            genes=report_genes,
            seconds=summary.seconds,
            exit_code=summary.exit_code,
            mpp=cfg.options.get("mpp"),
            isolate=isolate,
        )
        if "://" in cfg.out and (out / "report.html").is_file():
            _copy_summaries(out, cfg.out, names=("report.html",))
    return summary


def _run_all(
    jobs: list[SlideJob],
    cfg: RunConfig,
    out: Path,
    *,
    workers: int | None,
    scheduler: str | None,
    retries: int,
    isolate: bool,
    on_update: Callable[[dict[str, Any]], None] | None,
) -> BatchSummary:
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    if not jobs:
        return _finish(out, rows, t0, EXIT_NO_SLIDES)
    if workers is None and scheduler is None:
        rows = _run_in_process(jobs, cfg, isolate, on_update)
    else:
        if workers and not scheduler and cfg.torch_threads is None:
            from dataclasses import replace

            cfg = replace(cfg, torch_threads=max(1, (os.cpu_count() or 1) // workers))
        rows = _run_dask(jobs, cfg, workers, scheduler, retries, on_update)
    code = batch_exit_code(rows)
    summary = _finish(out, rows, t0, code)
    if "://" in cfg.out:  # keep a copy of the summaries with the outputs in the object store
        _copy_summaries(out, cfg.out)
    return summary


def _run_in_process(
    jobs: list[SlideJob], cfg: RunConfig, isolate: bool, on_update: Callable[[dict[str, Any]], None] | None
) -> list[dict[str, Any]]:
    rows = []
    for job in jobs:
        state = _run_slide_in_child(job, cfg) if isolate else run_slide(job, cfg)
        rows.append(state)
        if on_update:
            on_update(state)
    return rows


def _copy_summaries(run_dir: Path, out_url: str, names: tuple[str, ...] = ("summary.json", "summary.csv")) -> None:
    from .store import write_text_atomic

    for name in names:
        write_text_atomic(f"{out_url.rstrip('/')}/{name}", (run_dir / name).read_text())


def validate_run(cfg: RunConfig, *, workers: int | None = None, retries: int = 2) -> None:
    """UsageError naming the option unless every run option is valid; nothing is created."""
    from .infer import InferOptions, validate_options

    if workers is not None:
        check_range("--workers", workers, 1, 1024, integer=True)
    check_range("--retries", retries, 0, 100, integer=True)
    try:
        validate_options(InferOptions(**cfg.options), flags={"num_workers": "--slide-workers"})
    except TypeError as exc:
        raise UsageError(f"unknown run option ({exc})") from None
    model = cfg.options.get("model")
    if model is not None and "://" not in str(model) and not Path(model).exists():
        raise InputNotFoundError(f"{model}: model not found; pass a folder written by `wsi-histosge train`")
    for name, value in (("--out", cfg.out), ("--state-dir", cfg.state_dir)):
        if value is not None and "://" not in str(value) and Path(value).exists() and not Path(value).is_dir():
            raise UsageError(f"{name} {value}: is a file; give a folder for the outputs")


def batch_exit_code(rows: list[dict[str, Any]]) -> int:
    """0 all done; 10 some failed; 11 every slide failed; 15 none failed but some are locked by another
    run (they are that run's work, not failures)."""
    ok = sum(r.get("status") == "done" for r in rows)
    locked = sum(r.get("status") == "locked" for r in rows)
    failed = len(rows) - ok - locked
    if failed:
        return EXIT_ALL_FAILED if failed == len(rows) else EXIT_PARTIAL
    return EXIT_LOCKED if locked else EXIT_ALL_OK


def _dask_task(job: SlideJob, cfg: RunConfig) -> dict[str, Any]:
    return run_slide(job, cfg)


def _dask_client(workers: int | None, scheduler: str | None) -> tuple[Any, Any]:
    """A client of the given scheduler, or of a new LocalCluster of ``workers`` processes (and that cluster)."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler), None  # connect timeout: dask config distributed.comm.timeouts.connect
        except (OSError, TimeoutError, ValueError) as exc:
            raise UsageError(
                f"--scheduler {scheduler}: cannot connect ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                "check the address and that `dask scheduler` runs there"
            ) from None
    import torch

    resources = {"GPU": 1} if torch.cuda.is_available() else None
    cluster = LocalCluster(
        n_workers=workers or 1,
        threads_per_worker=1,
        processes=True,
        resources=resources,
        dashboard_address=None,
        silence_logs=40,
    )
    return Client(cluster), cluster


def _lost_worker_state(job: SlideJob, cfg: RunConfig, exc: Exception) -> dict[str, Any]:
    """A slide whose every try lost its worker: recorded failed, its lock released."""
    state = {
        "id": job.id,
        "slide": job.slide,
        "output": job.out_path(cfg.out),
        **job.extra,
        "status": "failed",
        "error": f"worker lost ({type(exc).__name__}): the slide crashed or killed its worker on every try",
    }
    SlideLock(cfg.run_dir(), job.id).release(force=True)
    _atomic_json(state_path(cfg.run_dir(), job.id), state)
    return state


def _submit_all(client: Any, jobs: list[SlideJob], cfg: RunConfig, retries: int) -> dict[Any, SlideJob]:
    """One task per slide, asking for a GPU when the cluster's workers declare GPUs."""
    gpu = bool(
        client.run_on_scheduler(
            lambda dask_scheduler: any("GPU" in (ws.resources or {}) for ws in dask_scheduler.workers.values())
        )
    )
    futures = {}
    for job in jobs:
        fut = client.submit(
            _dask_task,
            job,
            cfg,
            key=f"wsi-histosge-slide-{job.id}",
            pure=False,
            retries=retries,
            resources={"GPU": 1} if gpu else None,
        )
        futures[fut] = job
    return futures


def _run_dask(
    jobs: list[SlideJob],
    cfg: RunConfig,
    workers: int | None,
    scheduler: str | None,
    retries: int,
    on_update: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    from dask.distributed import as_completed

    client, cluster = _dask_client(workers, scheduler)
    try:
        futures = _submit_all(client, jobs, cfg, retries)
        rows = []
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                state = fut.result()
            except Exception as exc:
                state = _lost_worker_state(job, cfg, exc)
            rows.append(state)
            if on_update:
                on_update(state)
        order = {j.id: i for i, j in enumerate(jobs)}
        return sorted(rows, key=lambda r: order.get(r.get("id", ""), 0))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


SUMMARY_FIELDS = [
    "id",
    "slide",
    "status",
    "result",
    "spots",
    "tiles",
    "tissue_area_mm2",
    "spots_per_s",
    "unlike_training_share",
    "pen_ink_cells",
    "out_of_focus_cells",
    "uncertainty_median",
    "seconds",
    "output",
    "error",
]


def _flag_counts(trust: dict[str, Any]) -> dict[str, Any]:
    """The run report's trust summary as summary columns (blank where the model has no trust part)."""
    return {
        "unlike_training_share": trust.get("unlike_training_share", ""),
        "pen_ink_cells": trust.get("pen_ink", ""),
        "out_of_focus_cells": trust.get("out_of_focus", ""),
        "uncertainty_median": trust.get("uncertainty_median", ""),
    }


def _as_written(row: dict[str, Any]) -> dict[str, Any]:
    """A summary row as the CSV shows it: a failed slide's planned output is named only if it exists."""
    output = row.get("output")
    if row.get("status") == "failed" and output and not Path(str(output)).exists():
        return {**row, "output": ""}
    return row


def _finish(out: Path, rows: list[dict[str, Any]], t0: float, code: int) -> BatchSummary:
    summary = BatchSummary(rows, time.time() - t0, code)
    extra = sorted(
        {k for r in rows for k in r}
        - set(SUMMARY_FIELDS)
        - {"pid", "host", "started", "exit_code", "skipped", "options_key"}
    )
    tmp = out / ".summary.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS + extra, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(_as_written(r))
    os.replace(tmp, out / "summary.csv")
    _atomic_json(
        out / "summary.json",
        {
            "generator": GENERATOR,
            "exit_code": code,
            "seconds": summary.seconds,
            "counts": summary.counts,
            "slides": rows,
        },
    )
    return summary


__all__ = [
    "BatchSummary",
    "RunConfig",
    "SlideJob",
    "collect_jobs",
    "read_manifest",
    "read_states",
    "run_batch",
    "run_slide",
]

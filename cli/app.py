"""The `wsi-histosge` command line: parse, call the library, render. Every command works from Python too."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from wsi_histosge.errors import EXIT_CODES, HistoSGEError, OutputWriteError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Predict spatial gene expression from H&E whole-slide images (HisToSGE).",
)
console = Console(stderr=True)
out_console = Console()
_DEBUG = {"on": False}


#: OSError numbers that only writing gives (EACCES also reading: a write failure only under the output).
_WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _where_under(filename: Any, out: str | os.PathLike[str]) -> bool:
    """Whether ``filename`` lies in the folder that holds ``out`` (the output, its temporaries, its contents)."""
    where = Path(os.path.abspath(os.fspath(filename)))
    return where.is_relative_to(Path(os.path.abspath(os.fspath(out))).parent)


def _write_failure(exc: BaseException, out: str | os.PathLike[str] | None) -> HistoSGEError | None:
    """An OSError raised while writing ``out`` (disk full, read-only, quota, permissions) as OutputWriteError."""
    if out is None or not isinstance(exc, OSError) or isinstance(exc, HistoSGEError) or exc.errno is None:
        return None
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and "://" not in os.fspath(out):
        for folder in Path(os.fspath(out)).parents:
            if folder.exists() and not folder.is_dir():
                return UsageError(f"--out {out}: {folder} is a file, not a folder; choose another --out")
    if exc.errno not in _WRITE_ONLY_ERRNOS:
        if exc.errno not in (errno.EACCES, errno.EPERM) or exc.filename is None:
            return None
        if not _where_under(exc.filename, out):
            return None
    name = os.fspath(out)  # the output, not the temporary beside it that the failing write was making
    if exc.filename is not None and not _where_under(exc.filename, out):
        name = os.fspath(exc.filename)
    return OutputWriteError(
        f"{name}: writing failed ({os.strerror(exc.errno)}); free space or fix permissions (or choose another "
        "--out), then rerun the command"
    )


def _fail(exc: BaseException, out: str | os.PathLike[str] | None = None) -> None:
    if _DEBUG["on"] or isinstance(exc, typer.Exit):
        raise exc
    exc = _write_failure(exc, out) or exc
    if isinstance(exc, HistoSGEError):
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        console.print("[yellow]interrupted[/yellow]: rerun the same command to resume")
        raise typer.Exit(130)
    console.print(
        f"[red]internal error:[/red] {type(exc).__name__}: {escape(str(exc))} (rerun with --debug for the traceback)",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(1)


def _terminate_as_interrupt() -> None:
    """SIGTERM (a scheduler stopping the job, `kill`) ends the run like Ctrl-C: exit 130, resumable."""
    import signal

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)


def _one_line_warnings() -> None:
    """Warnings the tool gives (an --mpp that overrides the file's, ...) as one `warning:` line each, without
    the Python source line."""
    import warnings

    def show(message: Warning | str, category: type[Warning], *_args: object, **_kwargs: object) -> None:
        console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)

    warnings.showwarning = show  # type: ignore[assignment]


def _print_version(value: bool) -> None:
    if value:
        from wsi_histosge import __version__

        out_console.print(f"wsi-histosge {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
) -> None:
    _DEBUG["on"] = debug
    if not debug:
        _one_line_warnings()


@app.command()
def infer(
    slide: Annotated[
        str,
        typer.Argument(
            help="Slide file (SVS, TIFF, NDPI, MRXS, DICOM, JPEG/PNG with --mpp), a folder holding one DICOM series, "
            "or the s3:// / gs:// URL of a TIFF-based slide (read in place)."
        ),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Output Zarr folder (default: <slide>.zarr; for a URL, in this folder)."),
    ] = None,
    model: Annotated[
        Optional[Path], typer.Option(help="Model folder from `train` (default: the built-in model).")
    ] = None,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Local encoder weights file.")] = None,
    allow_download: Annotated[bool, typer.Option(help="Allow fetching encoder weights from the HF hub.")] = False,
    mpp: Annotated[Optional[float], typer.Option(help="Level-0 µm/px, overriding the file.")] = None,
    stride_um: Annotated[
        Optional[float], typer.Option(help="Lattice step in µm (default: half the model's spot).")
    ] = None,
    spot_um: Annotated[Optional[float], typer.Option(help="Spot diameter in µm (default: the model's).")] = None,
    context_um: Annotated[
        Optional[float], typer.Option(help="Image context per spot in µm (default: the model's).")
    ] = None,
    tissue_mask: Annotated[Optional[Path], typer.Option(help="GeoJSON (level-0 px) or mask image.")] = None,
    min_tissue_fraction: Annotated[Optional[float], typer.Option(help="Keep spots with this tissue fraction.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 (default: cuda if present).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16 (default: bf16/fp16 on GPU).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Patches per encoder forward pass.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes.")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the encoder.")] = False,
    on_bad_tile: Annotated[str, typer.Option(help="fail, or skip: mask corrupt tiles and count their spots.")] = "fail",
    overwrite: Annotated[bool, typer.Option(help="Replace an output made with other parameters.")] = False,
    novelty_threshold: Annotated[
        Optional[float],
        typer.Option(
            help="Flag cells more unlike the training tissue than this percentile of held-out training spots "
            "(default 95; flagged cells are kept)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run report as JSON.")] = False,
) -> None:
    """Predict a slide's expression cube (Zarr v3). Reruns resume; a complete output is left alone."""
    from wsi_histosge.infer import InferOptions, infer_slide
    from wsi_histosge.slide import default_output, slide_location

    try:
        where = slide_location(slide)  # a local Path, or a checked URL (never echoes credentials)
    except BaseException as exc:
        _fail(exc)
        return
    out = out or default_output(where)
    opts = InferOptions(
        model=model,
        encoder_weights=encoder_weights,
        allow_download=allow_download,
        mpp=mpp,
        stride_um=stride_um,
        spot_um=spot_um,
        context_um=context_um,
        tissue_mask=tissue_mask,
        min_tissue_fraction=min_tissue_fraction,
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=workers,
        compile=compile,
        overwrite=overwrite,
        on_bad_tile=on_bad_tile,
        novelty_threshold=novelty_threshold,
    )
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} spots/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=as_json,
    )
    task: dict[str, Any] = {}

    def on_progress(event: str, advance: int, total: int) -> None:
        if event == "start":
            progress.start()
            task["id"] = progress.add_task(where.name, total=total, rate="-")
        else:
            progress.advance(task["id"], advance)
            t = progress.tasks[0]
            rate = t.finished_speed or t.speed
            progress.update(task["id"], rate=f"{rate:.1f}" if rate else "-")

    _terminate_as_interrupt()
    try:
        result = infer_slide(where, out, opts, progress=on_progress, log=_log)
    except BaseException as exc:
        if task:
            progress.stop()
        _fail(exc, out)
        return
    if task:
        progress.stop()
    report = result.to_dict()
    if as_json:
        out_console.print_json(json.dumps(report))
        return
    table = Table(title=escape(f"{where.name} -> {out}"), show_header=False)
    for key in (
        "status",
        "spots",
        "tiles",
        "grid_shape",
        "stride_um",
        "tissue_area_mm2",
        "mpp",
        "mpp_source",
        "model",
        "encoder",
        "tta",
        "patches_encoded",
        "encoder_passes",
        "device",
        "precision",
        "spots_per_s",
    ):
        value = report[key]
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else escape(str(value)))
    if report.get("file_size"):
        share = report["bytes_read"] / report["file_size"]
        table.add_row("bytes read", f"{report['bytes_read']:,} of {report['file_size']:,} ({share:.1%} of the file)")
    for level, why in report.get("skipped_levels", {}).items():
        table.add_row(f"level {level} not used", escape(why))
    if (report.get("ink_excluded_mm2") or 0.0) >= 0.0005:  # shown to 3 decimals: no "0.000" row
        table.add_row("pen ink left out of tissue (mm²)", f"{report['ink_excluded_mm2']:.3f}")
    for key, value in _trust_rows(report.get("trust", {})):
        table.add_row(key, value)
    for key, value in report["timings_s"].items():
        table.add_row(f"time {key} (s)", f"{value:.2f}")
    console.print(table)


def _trust_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The run report's flag counts as table rows."""
    if not summary:
        return []
    cells = max(int(summary["cells"]), 1)
    rows = [
        (f"flagged {k.replace('_', ' ')}", f"{summary[k]} ({summary[k] / cells:.1%})")
        if summary.get(k) is not None
        else (f"flagged {k.replace('_', ' ')}", escape(str(summary.get(f"{k}_note", "not judged"))))
        for k in ("pen_ink", "out_of_focus")
    ]
    if "unlike_training" in summary:
        label = f"unlike training (> p{summary['novelty_threshold_percentile']:g})"
        rows.append((label, f"{summary['unlike_training']} ({summary['unlike_training_share']:.1%})"))
        if summary.get("uncertainty_median") is not None:
            rows.append(("uncertainty median (RMSE)", f"{summary['uncertainty_median']:.3f}"))
    return rows


@app.command()
def info(
    slide: Annotated[str, typer.Argument(help="Slide file, a DICOM series folder, or an s3:// / gs:// URL.")],
    mpp: Annotated[Optional[float], typer.Option(help="Level-0 µm/px override.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Levels, size, pixel size and its source, vendor, associated images."""
    from wsi_histosge.slide import open_slide

    try:
        data = open_slide(slide, mpp=mpp).info()
    except BaseException as exc:
        _fail(exc)
        return
    if as_json:
        out_console.print_json(json.dumps(data))
        return
    table = Table(title=escape(str(slide)), show_header=False)
    table.add_row("backend / vendor", f"{data['backend']} / {data['vendor']}")
    table.add_row("dimensions (level 0)", f"{data['dimensions'][0]} x {data['dimensions'][1]} px")
    m = data["mpp"]
    table.add_row(
        "MPP", f"{m['x']:.4f} x {m['y']:.4f} µm/px ({m['source']})" if m["x"] else f"[red]{escape(m['error'])}"
    )
    checks = {c["level"]: c for c in data.get("level_check", [])}
    for lv in data["levels"]:
        check = checks.get(lv["level"])
        verdict = ""
        if check is not None and lv["level"] > 0:
            verdict = (
                "  [green]checked ok[/green]" if check["ok"] else f"  [red]NOT USED: {escape(check['reason'])}[/red]"
            )
        table.add_row(
            f"level {lv['level']}",
            f"{lv['dimensions'][0]} x {lv['dimensions'][1]} (x{lv['downsample']:.2f}){verdict}",
        )
    table.add_row("associated images", ", ".join(data["associated_images"]) or "-")
    table.add_row("fingerprint", data["fingerprint"])
    out_console.print(table)


@app.command()
def encoders(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The encoder registry: input contract, weight source, licence."""
    from wsi_histosge.config import DEFAULT_ENCODER
    from wsi_histosge.encoders import list_encoders

    rows = list_encoders()
    if as_json:
        out_console.print_json(
            json.dumps(
                [
                    {
                        "name": c.name,
                        "architecture": c.architecture,
                        "embed_dim": c.embed_dim,
                        "input_px": c.input_px,
                        "mpp": c.mpp,
                        "context_um": c.context_um,
                        "weights": c.hf_hub_id or "package",
                        "license": c.license,
                        "gated": c.gated,
                        "description": c.description,
                        "default": c.name == DEFAULT_ENCODER,
                    }
                    for c in rows
                ]
            )
        )
        return
    table = Table(title="encoders (also: timm:<architecture>)")
    for col in ("name", "dim", "input", "µm/px", "weights", "license", "description"):
        table.add_column(col, no_wrap=col == "name")
    for c in rows:
        table.add_row(
            c.name + (" (default)" if c.name == DEFAULT_ENCODER else ""),
            str(c.embed_dim),
            f"{c.input_px}px",
            f"{c.mpp:g}",
            (c.hf_hub_id or "installed package") + (" (gated)" if c.gated else ""),
            c.license,
            c.description,
        )
    out_console.print(table)


@app.command()
def train(
    sections: Annotated[list[str], typer.Argument(help="Training sections (see `wsi-histosge train --help`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")],
    val: Annotated[Optional[list[str]], typer.Option(help="Validation section(s) for early stopping.")] = None,
    genes: Annotated[Optional[Path], typer.Option(help="Gene list (.txt one per line, or .npy of strings).")] = None,
    n_genes: Annotated[int, typer.Option(help="Top-N most variable genes when no --genes list.")] = 1000,
    encoder: Annotated[
        Optional[str], typer.Option(help="Encoder name (see `encoders`; default efficientnet-lite0-ms, offline).")
    ] = None,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Local encoder weights file.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs (default 400).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model folder.")] = False,
    add_genes: Annotated[
        Optional[list[str]],
        typer.Option(
            "--add-genes", help="Genes to predict besides the list, e.g. ERBB2,ESR1 (each measured in every section)."
        ),
    ] = None,
    tta: Annotated[
        str,
        typer.Option(
            help="Feature augmentation, a property of the model used by every run: none, or rot4 (mean over 4 "
            "rotations; 4 encoder passes per patch)."
        ),
    ] = "none",
) -> None:
    """Train a model on spatial-transcriptomics sections.

    A section is COUNTS.tsv[.gz]:SPOTS.tsv:IMAGE (legacy ST), OUTS_DIR:IMAGE[:hires] (Space Ranger),
    FILE.h5ad:IMAGE[:hires] (AnnData with raw counts), or her2st:ROOT:SECTION.
    """
    from wsi_histosge.train import parse_gene_names, train_sections

    defaults: dict[str, Any] = {k: v for k, v in {"encoder": encoder, "epochs": epochs}.items() if v is not None}
    try:
        extra = parse_gene_names(add_genes) if add_genes is not None else []
        summary = train_sections(
            sections,
            out,
            genes=genes,
            val=val or [],
            encoder_weights=encoder_weights,
            n_genes=n_genes,
            overwrite=overwrite,
            log=_log,
            tta=tta,
            extra_genes=extra,
            **defaults,
        )
    except BaseException as exc:
        _fail(exc, out)
        return
    from wsi_histosge.evaluate import _jsonable

    out_console.print_json(json.dumps(_jsonable(summary)))


@app.command()
def evaluate(
    model: Annotated[Optional[Path], typer.Argument(help="Model folder (omit with --protocol loso/recovery).")] = None,
    data: Annotated[Optional[list[str]], typer.Option(help="Held-out / protocol sections (repeatable).")] = None,
    train_data: Annotated[
        Optional[list[str]], typer.Option("--train", help="Training sections for the ridge baseline.")
    ] = None,
    protocol: Annotated[
        Optional[str], typer.Option(help="loso or recovery: train heads here instead of MODEL.")
    ] = None,
    n_genes: Annotated[
        Optional[int], typer.Option(help="Top-N variable genes for a protocol run (default 1000).")
    ] = None,
    genes: Annotated[Optional[Path], typer.Option(help="Gene list for a protocol run.")] = None,
    encoder: Annotated[
        Optional[str], typer.Option(help="Encoder for a protocol run (default efficientnet-lite0-ms).")
    ] = None,
    seeds: Annotated[
        Optional[int], typer.Option(help="Head fits per fold for a protocol run: mean ± SD over seeds (default 3).")
    ] = None,
    tta: Annotated[
        Optional[str],
        typer.Option(help="Feature augmentation for a protocol run: none (default) or rot4 (a MODEL uses its own)."),
    ] = None,
    bootstrap: Annotated[
        Optional[int],
        typer.Option(help="Bootstrap replicates over held-out spots for 95% intervals (default 1000; 0: none)."),
    ] = None,
    highres: Annotated[bool, typer.Option(help="Also check 4x-density predictions against spot level.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="HTML report to write.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="JSON of all numbers to write.")] = None,
) -> None:
    """Score a model (or the head under a protocol) next to ridge and training-mean baselines.

    Every score but SSIM comes with a 95% bootstrap interval over the held-out spots (a resample is not a map);
    a protocol fits the head with several seeds and reports mean ± SD over them (ridge and the training mean
    are deterministic). Ridge is scored for a MODEL when its training sections are given with --train.
    """
    from wsi_histosge import evaluate as ev
    from wsi_histosge import stats
    from wsi_histosge.encoders import TTA_ROTATIONS
    from wsi_histosge.stdata import read_section

    try:
        if seeds is not None and not 1 <= seeds <= ev.MAX_SEEDS:
            raise UsageError(f"--seeds must be between 1 and {ev.MAX_SEEDS} head fits per fold, got {seeds}")
        if bootstrap is not None and (
            bootstrap < 0 or 0 < bootstrap < stats.MIN_REPLICATES or bootstrap > stats.MAX_REPLICATES
        ):
            raise UsageError(
                f"--bootstrap must be 0 (no intervals) or {stats.MIN_REPLICATES}-{stats.MAX_REPLICATES} replicates "
                f"(a 95% interval needs at least {stats.MIN_REPLICATES}), got {bootstrap}"
            )
        if not data:
            raise UsageError("give the sections to evaluate with --data")
        if protocol is not None and model is not None:
            raise UsageError(
                f"give a MODEL folder or --protocol {protocol}, not both (a protocol trains its own heads)"
            )
        if seeds is not None and protocol is None:
            raise UsageError("--seeds is for --protocol loso/recovery (a trained MODEL has one set of weights)")
        for value, flag in ((encoder, "--encoder"), (genes, "--genes"), (n_genes, "--n-genes")):
            if value is not None and protocol is None:
                raise UsageError(
                    f"{flag} is for --protocol loso/recovery (a trained MODEL uses the encoder and genes in its "
                    "model.json)"
                )
        if tta is not None and protocol is None:
            raise UsageError(
                "--tta is for --protocol loso/recovery (a trained MODEL uses the augmentation in its model.json)"
            )
        if tta is not None and tta not in TTA_ROTATIONS:
            raise UsageError(f"--tta must be one of {', '.join(TTA_ROTATIONS)}, got {tta!r}")
        replicates = stats.REPLICATES if bootstrap is None else bootstrap
        for path, flag in ((report, "--report"), (json_out, "--json")):
            if path is not None:
                ev.check_report_target(path, flag)
        secs = [read_section(s) for s in data]
        if protocol is not None:
            result = _evaluate_protocol(
                protocol,
                secs,
                genes=genes,
                n_genes=ev.N_GENES if n_genes is None else n_genes,
                encoder=encoder,
                seeds=ev.SEEDS if seeds is None else seeds,
                replicates=replicates,
                tta=tta or "none",
            )
        else:
            if model is None:
                raise UsageError("give a MODEL folder, or --protocol loso/recovery")
            trains = [read_section(s) for s in train_data or []]
            result = _evaluate_model(model, secs, trains, highres=highres, replicates=replicates)
        if json_out:
            ev.write_json(result, json_out)
        if report:
            ev.write_html(result, report)
    except BaseException as exc:
        _fail(exc)
        return
    out_console.print_json(json.dumps(_summary(result)))


def _evaluate_protocol(
    protocol: str,
    secs: list[Any],
    *,
    genes: Path | None,
    n_genes: int,
    encoder: str | None,
    seeds: int,
    replicates: int,
    tta: str,
) -> dict[str, Any]:
    """Heads trained here under ``loso`` or ``recovery``, next to the baselines."""
    from wsi_histosge import evaluate as ev
    from wsi_histosge.config import DEFAULT_ENCODER
    from wsi_histosge.encoders import create_encoder
    from wsi_histosge.train import read_gene_list, select_genes

    if protocol not in ("loso", "recovery"):
        raise UsageError(f"--protocol must be loso or recovery, got {protocol!r}")
    enc = create_encoder(encoder or DEFAULT_ENCODER)
    gene_list = read_gene_list(genes) if genes else select_genes(secs, n_genes, log=_log)
    if protocol == "recovery":
        return ev.recovery(secs[0], gene_list, enc, seeds=seeds, replicates=replicates, log=_log, tta=tta)
    if len(secs) < 3:
        raise UsageError("leave-one-section-out needs at least 3 sections")
    return ev.loso(secs, gene_list, enc, seeds=seeds, replicates=replicates, log=_log, tta=tta)


def _evaluate_model(
    model: Path, secs: list[Any], trains: list[Any], *, highres: bool, replicates: int
) -> dict[str, Any]:
    """A trained model on held-out sections (and, with ``highres``, its 4x-density consistency)."""
    import tempfile

    from wsi_histosge import evaluate as ev
    from wsi_histosge.encoders import create_encoder
    from wsi_histosge.model import load_model

    m = load_model(model)
    enc = create_encoder(m.meta.encoder)
    result = ev.evaluate_model(m, secs, enc, train_sections=trains, replicates=replicates, log=_log)
    if highres:
        from wsi_histosge.highres import highres_consistency

        with tempfile.TemporaryDirectory() as tmp:
            result["highres"] = highres_consistency(m, secs[-1], Path(tmp), log=_log)
    return result


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: top-50 mean r per method, per section, as the mean of sections and pooled; with
    ``sd`` (over seeds, head only: ridge and the training mean are deterministic) and ``ci95`` (bootstrap over
    spots), and the paired difference to ridge with its interval."""
    out: dict[str, Any] = {"protocol": result["protocol"]}
    if "seeds" in result:
        out["seeds"] = len(result["seeds"])
    if "epoch_rule" in result:
        out["epoch_rule"] = result["epoch_rule"]
    if "encoder" in result:
        out["encoder"] = result["encoder"]["name"]
    if result.get("tta", "none") != "none":
        out["tta"] = result["tta"]
    for fold in result.get("folds", []):
        out[fold["section"]] = _headline(fold)
        for gene, methods in fold.get("per_gene", {}).items():
            out[fold["section"]].setdefault("genes_asked_for", {})[gene] = {
                m: {
                    "r": e["r"] if e["r"] is None else round(e["r"], 4),
                    "ci95": [None if v is None else round(v, 4) for v in e.get("interval", [])] or None,
                    **({"note": e["note"]} if e.get("note") else {}),
                }
                for m, e in methods.items()
            }
    if "mean_of_sections" in result:
        out["mean_of_sections"] = _headline(result["mean_of_sections"])
    if "pooled" in result:
        out["pooled_top50_mean_r"] = {
            m: round(v["pooled_top50"]["mean_r"], 4) for m, v in result["pooled"].items() if "pooled_top50" in v
        }
    if "highres" in result:
        out["highres"] = result["highres"]
    if "gene_overlap" in result:
        out["gene_overlap"] = {k: v for k, v in result["gene_overlap"].items() if k != "rule"}
    return out


def _headline(fold: dict[str, Any], key: str = "top50", metric: str = "mean_r") -> dict[str, Any]:
    """``{method: {"mean_r", "sd", "ci95"}, "head-ridge": {"difference", "ci95"}}`` of one fold (or the mean of
    sections) on the top-50 genes; a bare number when there is neither spread nor interval."""

    def rounded(v: Any) -> Any:
        return [None if x is None else round(x, 4) for x in v] if isinstance(v, list) else round(v, 4)

    out: dict[str, Any] = {}
    for method, per_key in fold["scores"].items():
        entry: dict[str, Any] = {metric: rounded(per_key[key][metric])}
        sd = fold.get("sd_over_seeds", {}).get(method, {}).get(key, {}).get(metric)
        if sd is not None:
            entry["sd"] = rounded(sd)
        ci = fold.get("intervals", {}).get(method, {}).get(key, {}).get(metric)
        if ci is not None:
            entry["ci95"] = rounded(ci)
        out[method] = entry if len(entry) > 1 else entry[metric]
    for name, per_key in fold.get("paired", {}).items():
        if key in per_key:
            d = per_key[key][metric]
            out[name] = {"difference": rounded(d["difference"]), "ci95": rounded(d["interval"])}
    return out


def _log(message: str) -> None:
    console.print(escape(message), highlight=False, soft_wrap=True)


@app.command("to-anndata")
def to_anndata_cmd(
    cube: Annotated[str, typer.Argument(help="Cube written by `infer` (path or URL).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad file.")],
    resolution: Annotated[Optional[str], typer.Option(help="native or spot (default native).")] = None,
    bin_um: Annotated[
        Optional[float],
        typer.Option(help="Bin size in µm, at least the stride (other than a multiple: area-weighted)."),
    ] = None,
    layout: Annotated[
        Optional[str],
        typer.Option(help="grid (square bins, default) or visium (55 µm spots, 100 µm hexagonal pitch)."),
    ] = None,
    visium_positions: Annotated[
        Optional[Path],
        typer.Option(help="Space Ranger's tissue_positions.csv of a run on this slide: its spots (implies visium)."),
    ] = None,
    library_id: Annotated[Optional[str], typer.Option(help="Key in uns['spatial'] (default: slide name).")] = None,
    slide: Annotated[Optional[str], typer.Option(help="The slide (path or URL), if it moved since `infer`.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing .h5ad.")] = False,
    allow_incomplete: Annotated[
        bool, typer.Option(help="Convert what an incomplete cube holds (marked partial in uns) instead of refusing.")
    ] = False,
) -> None:
    """Convert a cube to AnnData (.h5ad) for scanpy/squidpy, binned in linear space."""
    from wsi_histosge.convert import to_anndata

    res = _resolution(resolution, bin_um)
    try:
        path = to_anndata(
            cube,
            out,
            resolution=res,
            layout=_layout(layout, visium_positions),
            visium_positions=visium_positions,
            library_id=library_id,
            slide=slide,
            overwrite=overwrite,
            allow_incomplete=allow_incomplete,
        )
    except BaseException as exc:
        _fail(exc, out)
        return
    console.print(f"wrote {escape(str(path))}", highlight=False, soft_wrap=True)


def _layout(layout: str | None, positions: Path | None) -> str:
    if layout is not None and layout not in ("grid", "visium"):
        _fail(UsageError(f"--layout must be grid or visium, got {layout!r}"))
    if positions is not None and layout not in (None, "visium"):
        _fail(UsageError(f"--visium-positions places Visium spots; leave out --layout {layout}"))
    return "visium" if positions is not None else (layout or "grid")


def _resolution(resolution: str | None, bin_um: float | None) -> str | float:
    if bin_um is not None and resolution is not None:
        _fail(UsageError("give --bin-um or --resolution, not both"))
    res: str | float = bin_um if bin_um is not None else (resolution or "native")
    if isinstance(res, str) and res not in ("native", "spot"):
        _fail(UsageError(f"--resolution must be native or spot, got {res!r} (use --bin-um for µm)"))
    return res


@app.command("to-spatialdata")
def to_spatialdata_cmd(
    cube: Annotated[str, typer.Argument(help="Cube written by `infer` (path or URL).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output SpatialData store (a .zarr folder).")],
    resolution: Annotated[Optional[str], typer.Option(help="native or spot (default native).")] = None,
    bin_um: Annotated[
        Optional[float],
        typer.Option(help="Bin size in µm, at least the stride (other than a multiple: area-weighted)."),
    ] = None,
    layout: Annotated[
        Optional[str],
        typer.Option(help="grid (square bins, default) or visium (55 µm spots, 100 µm hexagonal pitch)."),
    ] = None,
    visium_positions: Annotated[
        Optional[Path],
        typer.Option(help="Space Ranger's tissue_positions.csv of a run on this slide: its spots (implies visium)."),
    ] = None,
    image_mpp: Annotated[
        Optional[float], typer.Option(help="Finest image level written, in µm/px (default: level 0, the full slide).")
    ] = None,
    library_id: Annotated[
        Optional[str], typer.Option(help="Library id recorded in the table (default: slide name).")
    ] = None,
    slide: Annotated[Optional[str], typer.Option(help="The slide (path or URL), if it moved since `infer`.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a store written earlier by this command.")] = False,
    allow_incomplete: Annotated[
        bool, typer.Option(help="Convert what an incomplete cube holds (marked partial) instead of refusing.")
    ] = False,
) -> None:
    """Slide image (multiscale), bins as shapes and their AnnData table as one SpatialData Zarr store
    (spatialdata.read_zarr, napari-spatialdata, spatialdata-plot)."""
    from wsi_histosge.sdata import to_spatialdata

    res = _resolution(resolution, bin_um)
    try:
        path = to_spatialdata(
            cube,
            out,
            resolution=res,
            layout=_layout(layout, visium_positions),
            visium_positions=visium_positions,
            image_mpp=image_mpp,
            library_id=library_id,
            slide=slide,
            overwrite=overwrite,
            allow_incomplete=allow_incomplete,
        )
    except BaseException as exc:
        _fail(exc, out)
        return
    console.print(f"wrote {escape(str(path))}", highlight=False, soft_wrap=True)


@app.command("to-qupath")
def to_qupath_cmd(
    cube: Annotated[str, typer.Argument(help="Cube written by `infer` (path or URL).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .geojson (or .json, or .zip to compress).")],
    genes: Annotated[Optional[str], typer.Option(help="Comma-separated genes to export as measurements.")] = None,
    all_genes: Annotated[bool, typer.Option("--all-genes", help="Export every gene of the model.")] = False,
    resolution: Annotated[Optional[str], typer.Option(help="native or spot (default native).")] = None,
    bin_um: Annotated[Optional[float], typer.Option(help="Bin size in µm (a multiple of the stride).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an export written earlier by this command.")] = False,
    allow_incomplete: Annotated[
        bool, typer.Option(help="Export what an incomplete cube holds (marked partial) instead of refusing.")
    ] = False,
) -> None:
    """Predicted bins as QuPath detections (GeoJSON) with one measurement per gene: File > Import objects,
    then Measure > Show measurement maps."""
    from wsi_histosge.qupath import to_qupath

    if bin_um is not None and resolution is not None:
        _fail(UsageError("give --bin-um or --resolution, not both"))
    res: str | float = bin_um if bin_um is not None else (resolution or "native")
    if isinstance(res, str) and res not in ("native", "spot"):
        _fail(UsageError(f"--resolution must be native or spot, got {res!r} (use --bin-um for µm)"))
    names = [g.strip() for g in genes.split(",") if g.strip()] if genes is not None else None
    try:
        result = to_qupath(
            cube,
            out,
            genes=names,
            all_genes=all_genes,
            resolution=res,
            overwrite=overwrite,
            allow_incomplete=allow_incomplete,
        )
    except BaseException as exc:
        _fail(exc, out)
        return
    console.print(
        f"wrote {escape(str(result.path))}: {result.detections} detections ({result.bin_um:g} µm bins) x "
        f"{len(result.genes)} gene{'s' if len(result.genes) != 1 else ''}"
        + (" (partial cube)" if result.partial else "")
        + "; QuPath: File > Import objects, then Measure > Show measurement maps",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def plot(
    cube: Annotated[str, typer.Argument(help="Cube written by `infer` (path or URL).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for PNGs.")],
    genes: Annotated[Optional[str], typer.Option(help="Comma-separated gene names.")] = None,
    qc: Annotated[bool, typer.Option(help="Also draw the tissue/QC overview.")] = True,
    slide: Annotated[Optional[str], typer.Option(help="The slide (path or URL), if it moved since `infer`.")] = None,
    max_px: Annotated[int, typer.Option(help="Long side of the thumbnail in px.")] = 1600,
    allow_incomplete: Annotated[
        bool, typer.Option(help="Draw what an incomplete cube holds (marked partial) instead of refusing.")
    ] = False,
) -> None:
    """Gene maps over the slide (colour bar, units, scale bar) and a QC overview, as PNG."""
    from wsi_histosge.plot import plot_genes, plot_qc

    if not qc and not (genes and genes.strip(", ")):
        _fail(UsageError("nothing to draw: give --genes A,B (gene maps) or leave out --no-qc (the QC overview)"))
    made_out = not out.exists()
    try:
        if qc and out.is_dir():  # before any gene map is drawn
            from wsi_histosge.owned import require_replaceable

            require_replaceable([out / "qc.png"], "the QC overview of `plot`")
        written = []
        if genes:
            names = [g.strip() for g in genes.split(",") if g.strip()]
            written += plot_genes(cube, names, out, slide=slide, max_px=max_px, allow_incomplete=allow_incomplete)
        if qc:
            written.append(plot_qc(cube, out / "qc.png", slide=slide, max_px=max_px, allow_incomplete=allow_incomplete))
    except BaseException as exc:
        if made_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # the folder this command made, left empty: no output that looks like a result
        _fail(exc, out)
        return
    for path in written:
        console.print(f"wrote {escape(str(path))}", highlight=False, soft_wrap=True)


@app.command()
def batch(
    inputs: Annotated[list[str], typer.Argument(help="Slides, globs, folders, or a CSV manifest (slide,id,mpp,...).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder or URL (s3://...): <id>.zarr, summaries.")],
    state_dir: Annotated[Optional[Path], typer.Option(help="Local folder for state/locks (URL outputs).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Run on a dask LocalCluster with N workers.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Address of a running dask scheduler.")] = None,
    retries: Annotated[int, typer.Option(help="Retries of a slide whose worker was lost (dask).")] = 2,
    retry_failed: Annotated[bool, typer.Option(help="Try slides that failed in an earlier run again.")] = False,
    slides_under: Annotated[
        Optional[list[Path]],
        typer.Option(help="Only read slides and masks under this folder (repeatable; for services)."),
    ] = None,
    model: Annotated[Optional[Path], typer.Option(help="Model folder (default: the built-in model).")] = None,
    stride_um: Annotated[Optional[float], typer.Option(help="Lattice step in µm.")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="µm/px for slides without one (a manifest column wins).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda.")] = None,
    slide_workers: Annotated[Optional[int], typer.Option(help="DataLoader workers per slide.")] = None,
    novelty_threshold: Annotated[
        Optional[float], typer.Option(help="Flag cells above this training percentile of novelty (default 95).")
    ] = None,
    report_genes: Annotated[
        Optional[str],
        typer.Option(
            help="Genes mapped in report.html, comma-separated (default: ERBB2,EPCAM,COL1A1 when the model has "
            'them, else its first 3; "" for none).'
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run a cohort: resumable, one slide's failure never stops the others; writes summary.csv, summary.json and
    report.html (one row per slide, failed first). Exit 0 all done, 10 some failed,
    11 all failed, 12 no slides, 15 none failed but some are locked by another run, 130 interrupted."""
    from wsi_histosge.cohort import EXIT_INTERRUPTED, RunConfig, collect_jobs, run_batch, validate_run

    given = {
        "stride_um": stride_um,
        "mpp": mpp,
        "device": device,
        "num_workers": slide_workers,
        "novelty_threshold": novelty_threshold,
    }
    options = {k: v for k, v in {"model": str(model) if model else None, **given}.items() if v is not None}
    cfg = RunConfig(
        out=out, options=options, retry_failed=retry_failed, state_dir=str(state_dir) if state_dir else None
    )
    from wsi_histosge.report import check_report_genes, parse_report_genes

    try:
        validate_run(cfg, workers=workers, retries=retries)
        genes = parse_report_genes(report_genes) if report_genes is not None else None
        if genes:
            check_report_genes(genes, model)
        jobs = collect_jobs(inputs, slides_under=slides_under or [])
    except BaseException as exc:
        _fail(exc)
        return
    _terminate_as_interrupt()
    live = _BatchTable(len(jobs), out, transient=as_json)
    try:
        try:
            summary = run_batch(
                jobs,
                cfg,
                workers=workers,
                scheduler=scheduler,
                retries=retries,
                on_update=live.update,
                report_genes=genes,
            )
        finally:
            live.stop(newline=not as_json)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: state is saved; rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BaseException as exc:
        _fail(exc, out)
        return
    _print_batch_summary(summary, cfg, as_json)
    raise typer.Exit(summary.exit_code)


class _BatchTable:
    """The live table of finished slides, shown from the first finished slide on (so an error before any
    slide ran stays one line)."""

    def __init__(self, n: int, out: str, *, transient: bool) -> None:
        from rich.live import Live

        self.n = n
        self.done: dict[str, int] = {}
        self.table = Table(title=escape(f"{n} slide{'s' if n != 1 else ''} -> {out}"))
        for col in ("id", "status", "spots", "seconds", "error"):
            self.table.add_column(col, overflow="fold")
        self.live = Live(self.table, console=console, refresh_per_second=2, transient=transient)

    def update(self, state: dict[str, Any]) -> None:
        if not self.live.is_started:
            self.live.start()
        status = str(state.get("status", "?"))
        self.done[status] = self.done.get(status, 0) + 1
        self.table.add_row(
            escape(str(state.get("id"))),
            status,
            str(state.get("spots", "")),
            f"{state.get('seconds', 0):.1f}",
            escape(str(state.get("error", ""))[:200]),
        )
        self.table.caption = ", ".join(f"{k}: {v}" for k, v in self.done.items()) + f" of {self.n}"

    def stop(self, *, newline: bool) -> None:
        if self.live.is_started:
            self.live.stop()
            if newline and not console.is_terminal:
                console.line()  # the last frame ends without a newline when stderr is not a terminal


def _print_batch_summary(summary: Any, cfg: Any, as_json: bool) -> None:
    if as_json:
        payload = {"exit_code": summary.exit_code, "counts": summary.counts, "seconds": summary.seconds}
        out_console.print_json(json.dumps({**payload, "slides": summary.rows}, default=str))
        return
    counts = ", ".join(f"{k}: {v}" for k, v in summary.counts.items())
    report = cfg.run_dir() / "report.html"
    _log(
        f"{counts} in {summary.seconds:.1f} s; summary: {cfg.run_dir() / 'summary.csv'}"
        + (f"; report: {report}" if report.is_file() else "")
    )
    locked = [r for r in summary.rows if r.get("status") == "locked"]
    if locked:
        _log(
            f"{len(locked)} slide(s) are being processed by another run ({locked[0].get('error', '')}); "
            "they were left alone: rerun when that run has finished"
        )


@app.command()
def status(
    out: Annotated[str, typer.Argument(help="Output folder (or URL) of `batch`.")],
    state_dir: Annotated[Optional[Path], typer.Option(help="The --state-dir the batch used, if any.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What is done, running, failed (and why) in a batch output folder (reads only the state files)."""
    from wsi_histosge.cohort import read_states, run_dir_for

    try:
        states = read_states(run_dir_for(out, state_dir))
    except BaseException as exc:
        _fail(exc)
        return
    if as_json:
        out_console.print_json(json.dumps(states, default=str))
        return
    table = Table(title=escape(str(out)))
    for col in ("id", "status", "spots", "error"):
        table.add_column(col, overflow="fold")
    for s in states:
        table.add_row(
            escape(str(s.get("id"))),
            str(s.get("status")),
            str(s.get("spots", "")),
            escape(str(s.get("error", ""))[:200]),
        )
    counts: dict[str, int] = {}
    for s in states:
        counts[str(s.get("status"))] = counts.get(str(s.get("status")), 0) + 1
    table.caption = ", ".join(f"{k}: {v}" for k, v in counts.items()) or "no slides"
    out_console.print(table)


@app.command()
def verify(
    cube: Annotated[str, typer.Argument(help="Cube written by `infer` (path or URL).")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check a cube: completion marker, done marks, and that no chunk of the expression or of a trust array
    (novelty, uncertainty, qc) is missing (exit 13 if not)."""
    from wsi_histosge.store import verify_cube

    try:
        report = verify_cube(cube)
    except BaseException as exc:
        _fail(exc)
        return
    if as_json:
        out_console.print_json(json.dumps(report))
    elif report["ok"]:
        console.print(f"{escape(cube)}: ok ({report['chunks_done']}/{report['chunks']} chunks)", highlight=False)
    else:
        for problem in report["problems"]:
            console.print(f"[red]{escape(cube)}:[/red] {escape(str(problem))}", highlight=False, soft_wrap=True)
    raise typer.Exit(0 if report["ok"] else 13)


@app.command()
def doctor(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Preflight: versions, device, readers, the built-in model and its offline encoder weights."""
    import importlib.metadata as md
    import os
    import platform

    checks: list[tuple[str, bool, str]] = []

    def check(name: str, fn: Any) -> None:
        try:
            detail = fn()
            checks.append((name, True, str(detail)))
        except Exception as exc:
            checks.append((name, False, f"{type(exc).__name__}: {exc}"))

    import torch

    check("python", platform.python_version)
    check("torch / torchvision", lambda: f"{torch.__version__} / {md.version('torchvision')}")
    check("device", lambda: torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu only (slow)")
    check("tiffslide", lambda: md.version("tiffslide"))
    check("openslide", lambda: __import__("openslide").__library_version__)
    check("zarr", lambda: md.version("zarr"))

    def default_model() -> str:
        from wsi_histosge.encoders import create_encoder
        from wsi_histosge.model import default_model_path, load_model

        m = load_model(default_model_path())
        enc = create_encoder(m.meta.encoder)
        if enc.weights_hash != m.meta.encoder_weights_sha256:
            raise RuntimeError("installed encoder weights differ from the ones the model was trained with")
        return f"{m.meta.name}: {m.n_genes} genes, encoder {m.meta.encoder} (offline weights ok)"

    check("built-in model", default_model)
    check(
        "HF_TOKEN", lambda: "set (not shown)" if os.environ.get("HF_TOKEN") else "not set (only gated encoders need it)"
    )
    rows = [{"check": n, "ok": ok, "detail": d} for n, ok, d in checks]
    if as_json:
        out_console.print_json(json.dumps(rows))
    else:
        table = Table(title="wsi-histosge doctor")
        for col in ("check", "ok", "detail"):
            table.add_column(col, overflow="fold")
        for name, ok, detail in checks:
            table.add_row(name, "[green]ok[/green]" if ok else "[red]FAIL[/red]", escape(detail))
        out_console.print(table)
    raise typer.Exit(0 if all(ok for _, ok, _ in checks) else 1)


@app.command("exit-codes")
def exit_codes() -> None:
    """The documented exit codes."""
    for code, meaning in EXIT_CODES.items():
        out_console.print(f"{code:>3}  {meaning}")


def main(argv: list[str] | None = None) -> None:
    """The `wsi-histosge` entry point: option errors are one line naming the option (exit 2)."""
    import sys

    try:  # typer >= 0.2x carries its own copy of click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover - older typer on the real click
        from click import exceptions as click_exc  # type: ignore[no-redef]

    try:
        code = app(args=argv, prog_name="wsi-histosge", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:
        out_console.print(exc.ctx.get_help() if exc.ctx else "wsi-histosge --help", highlight=False)
        sys.exit(0)
    except click_exc.UsageError as exc:
        where = f"wsi-histosge {exc.ctx.info_name} --help" if exc.ctx and exc.ctx.parent else "wsi-histosge --help"
        message = " ".join(exc.format_message().split())
        console.print(f"[red]error:[/red] {escape(message)} (see `{where}`)", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.print("[yellow]interrupted[/yellow]: rerun the same command to resume")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

"""Pictures of a cube: gene maps over the slide thumbnail, a grid of several genes, a QC overview.

Each map carries the gene name, units, a colour bar and a scale bar in µm; off-tissue cells are
transparent. Thumbnails are sized for a screen (``max_px`` on the long side), whatever the slide's size.

An incomplete cube (no completion marker, or chunks missing on disk) is refused (CubeIncompleteError)
unless ``allow_incomplete``: then the cells of unreadable chunks stay transparent, never drawn as
expression, and each picture says that it is partial.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError, check_range
from .owned import PNG_SOFTWARE, require_replaceable
from .qc import QC_BLUR, QC_PEN
from .slide import Slide, open_slide, recorded_slide
from .store import ATTR_KEY, read_cells, read_cube
from .trust import QC_NOVEL


def _setup() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class _Canvas:
    """Thumbnail of the slide and the mapping from lattice cells to thumbnail pixels."""

    def __init__(self, cube: str | Path, slide: str | Path | None, max_px: int, allow_incomplete: bool) -> None:
        check_range("--max-px", max_px, 64, 16384, integer=True)
        self.cube = read_cube(cube)
        if not allow_incomplete:
            self.cube.require_complete()
        self.lacking = self.cube.lacking() if not self.cube.completed or self.cube.missing else []
        self.attrs: dict[str, Any] = self.cube.attrs
        meta: dict[str, Any] = self.attrs[ATTR_KEY]
        path = recorded_slide(meta["slide"]["path"], slide, meta["slide"].get("fingerprint"))  # a URL stays a URL
        self.slide: Slide = open_slide(path, mpp=float(meta["mpp"]["x"]))
        w0, h0 = self.slide.dimensions
        thumb_mpp = max(self.slide.mpp.x, max(w0, h0) * self.slide.mpp.x / max_px)
        self.thumb, self.thumb_mpp = self.slide.thumbnail(thumb_mpp)
        self.genes = list(self.attrs["genes"])
        self.stride = float(self.attrs["stride_um"])
        self.tissue = self.cube.usable_cells()
        ox, oy = self.attrs["origin_um"]
        ny, nx = self.tissue.shape
        # lattice cells are squares of side `stride` centred on their spot; extent in thumbnail px
        s = self.stride / self.thumb_mpp
        self.extent = (
            (ox / self.thumb_mpp) - s / 2,
            (ox / self.thumb_mpp) + (nx - 0.5) * s,
            (oy / self.thumb_mpp) + (ny - 0.5) * s,
            (oy / self.thumb_mpp) - s / 2,
        )

    def check_gene(self, gene: str) -> None:
        """UsageError naming ``gene`` (and similar names) unless the model predicts it."""
        if gene not in self.genes:
            close = [g for g in self.genes if g.upper().startswith(gene.upper()[:3])][:5]
            raise UsageError(
                f"gene {gene!r} is not in the model's {len(self.genes)} genes"
                + (f" (similar: {', '.join(close)})" if close else "")
            )

    def gene_map(self, gene: str) -> np.ndarray:
        self.check_gene(gene)
        ny, nx = self.tissue.shape
        return self.cube.read_expression(0, ny, 0, nx, gene=self.genes.index(gene))

    @property
    def partial_note(self) -> str:
        """'' for a complete cube, else what is lacking (shown on every picture of a partial cube)."""
        if not self.lacking and self.cube.completed:
            return ""
        return f" (partial: {len(self.lacking)} of {self.cube.marks.size} chunks lacking)"

    def scalebar(self, ax: Any) -> None:
        from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

        width_um = self.thumb.shape[1] * self.thumb_mpp
        nice = [u for u in (50, 100, 200, 500, 1000, 2000, 5000, 10000) if u <= width_um / 4] or [width_um / 4]
        um = nice[-1]
        label = f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"
        ax.add_artist(
            AnchoredSizeBar(
                ax.transData,
                um / self.thumb_mpp,
                label,
                "lower right",
                pad=0.4,
                color="black",
                frameon=True,
                size_vertical=max(1, self.thumb.shape[0] / 150),
            )
        )

    def draw_gene(self, ax: Any, gene: str, cmap: str, alpha: float) -> Any:
        m = self.gene_map(gene)
        ax.imshow(self.thumb)
        vals = m[np.isfinite(m)]
        vmin, vmax = np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0)
        im = ax.imshow(
            np.ma.masked_invalid(m),
            cmap=cmap,
            alpha=alpha,
            extent=self.extent,
            interpolation="nearest",
            vmin=vmin,
            vmax=vmax,
        )
        ax.set_title(gene + self.partial_note)
        ax.set_axis_off()
        self.scalebar(ax)
        return im

    def cells(self, name: str) -> np.ndarray | None:
        """The cube's per-cell array ``name`` (novelty, uncertainty, qc), None when it has none."""
        return read_cells(self.cube, name)

    @property
    def has_reliability(self) -> bool:
        return "uncertainty" in self.cube.group or "qc" in self.cube.group

    def flag_counts(self) -> dict[str, int]:
        flags = self.cells("qc")
        if flags is None:
            return {}
        return {name: int(((flags & bit) > 0).sum()) for name, bit in FLAG_NAMES.items()}

    def draw_flags(self, ax: Any, *, legend: bool = True) -> list[Any]:
        """Artefact flags as tints (pen ink over out of focus), cells unlike the training tissue hatched (so the
        map below stays readable); their legend entries."""
        from matplotlib.colors import to_rgba
        from matplotlib.patches import Patch

        flags = self.cells("qc")
        if flags is None or not flags.any():
            return []
        overlay = np.zeros((*flags.shape, 4), dtype=np.float32)
        handles = []
        for name in ("out of focus", "pen ink"):
            hit = (flags & FLAG_NAMES[name]) > 0
            if hit.any():
                overlay[hit] = to_rgba(FLAG_COLOURS[name], 0.6)
                handles.append(Patch(color=FLAG_COLOURS[name], alpha=0.6, label=f"{name} ({int(hit.sum())})"))
        if overlay[..., 3].any():
            ax.imshow(overlay, extent=self.extent, interpolation="nearest")
        novel = (flags & QC_NOVEL) > 0
        if novel.any():
            ox, oy = self.attrs["origin_um"]
            s = self.stride / self.thumb_mpp
            ny, nx = novel.shape
            # cell edges in thumbnail px: a step function, so the hatched area is exactly the flagged cells
            xs = ox / self.thumb_mpp + (np.arange(nx * 2) // 2 + np.tile([-0.5, 0.5], nx)) * s
            ys = oy / self.thumb_mpp + (np.arange(ny * 2) // 2 + np.tile([-0.5, 0.5], ny)) * s
            z = np.repeat(np.repeat(novel.astype(float), 2, axis=0), 2, axis=1)
            ax.contourf(xs, ys, z, levels=[0.5, 1.5], colors="none", hatches=["///"])
            ax.contour(xs, ys, z, levels=[0.5], colors=FLAG_COLOURS["unlike training"], linewidths=0.8)
            label = f"unlike training ({int(novel.sum())})"
            handles.append(Patch(facecolor="none", edgecolor=FLAG_COLOURS["unlike training"], hatch="///", label=label))
        if legend:
            ax.legend(handles=handles, loc="upper right", fontsize=7)
        return handles

    def draw_reliability(self, ax: Any) -> Any:
        """The expected error of every cell (models with a trust part) with the flagged cells outlined; the
        flags alone for cubes without uncertainty."""
        ax.imshow(self.thumb)
        unc = self.cells("uncertainty")
        im = None
        if unc is not None:
            vals = unc[np.isfinite(unc)]
            vmin, vmax = np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0)
            im = ax.imshow(
                np.ma.masked_invalid(unc),
                cmap="viridis",
                alpha=0.75,
                extent=self.extent,
                interpolation="nearest",
                vmin=vmin,
                vmax=vmax,
            )
        self.draw_flags(ax)
        ax.set_title("reliability: expected error" if unc is not None else "reliability: quality flags")
        ax.set_axis_off()
        return im


#: Quality flags as the pictures name and colour them.
FLAG_NAMES = {"pen ink": QC_PEN, "out of focus": QC_BLUR, "unlike training": QC_NOVEL}
FLAG_COLOURS = {"pen ink": "tab:blue", "out of focus": "tab:orange", "unlike training": "red"}


def _save(fig: Any, path: Path) -> None:
    """PNG via a temporary and a rename: a failed write never leaves a truncated picture under ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": PNG_SOFTWARE})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_genes(
    cube: str | Path,
    genes: list[str],
    out_dir: str | Path,
    *,
    slide: str | Path | None = None,
    max_px: int = 1600,
    cmap: str = "magma",
    alpha: float = 0.75,
    grid: bool = True,
    allow_incomplete: bool = False,
) -> list[Path]:
    """One PNG per gene (and ``genes_grid.png`` when several) in ``out_dir``.

    An incomplete cube raises CubeIncompleteError unless ``allow_incomplete`` (see the module docstring)."""
    plt = _setup()
    canvas = _Canvas(cube, slide, max_px, allow_incomplete)
    for gene in genes:
        canvas.check_gene(gene)  # all names before drawing anything
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: is a file; --out takes a folder for the PNGs")
    targets = [out_dir / f"{gene}.png" for gene in genes] + (
        [out_dir / "genes_grid.png"] if grid and len(genes) > 1 else []
    )
    require_replaceable(targets, "a gene map of `plot`")
    out_dir.mkdir(parents=True, exist_ok=True)
    units = canvas.attrs["units"]
    written = []
    aspect = canvas.thumb.shape[0] / canvas.thumb.shape[1]
    panels = 2 if canvas.has_reliability else 1
    for gene in genes:
        fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 8 * aspect + 0.6), dpi=150, squeeze=False)
        im = canvas.draw_gene(axes[0, 0], gene, cmap, alpha)
        fig.colorbar(im, ax=axes[0, 0], fraction=0.04, pad=0.02, label=f"{gene}, {units}")
        if panels == 2:
            rel = canvas.draw_reliability(axes[0, 1])
            if rel is not None:
                fig.colorbar(rel, ax=axes[0, 1], fraction=0.04, pad=0.02, label=f"expected RMSE, {units}")
        path = out_dir / f"{gene}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    if grid and len(genes) > 1:
        cols = min(3, len(genes))
        rows = -(-len(genes) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 5 * aspect * rows + 0.5), dpi=120, squeeze=False)
        for ax, gene in zip(axes.ravel(), genes, strict=False):
            im = canvas.draw_gene(ax, gene, cmap, alpha)
            fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label=units)
        for ax in axes.ravel()[len(genes) :]:
            ax.set_axis_off()
        path = out_dir / "genes_grid.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def _fact(meta: dict[str, Any], *keys: str) -> Any:
    """A provenance entry for the QC caption, '?' where an older or foreign cube lacks it."""
    val: Any = meta
    for key in keys:
        val = val.get(key) if isinstance(val, dict) else None
    return "?" if val is None else val


def plot_qc(
    cube: str | Path,
    out: str | Path,
    *,
    slide: str | Path | None = None,
    max_px: int = 1600,
    allow_incomplete: bool = False,
) -> Path:
    """Tissue outline, predicted spots and run facts over the thumbnail.

    An incomplete cube raises CubeIncompleteError unless ``allow_incomplete`` (see the module docstring)."""
    plt = _setup()
    canvas = _Canvas(cube, slide, max_px, allow_incomplete)
    meta: dict[str, Any] = canvas.attrs[ATTR_KEY]
    fig, ax = plt.subplots(figsize=(9, 9 * canvas.thumb.shape[0] / canvas.thumb.shape[1] + 1.2), dpi=150)
    ax.imshow(canvas.thumb)
    ny, nx = canvas.tissue.shape
    s = canvas.stride / canvas.thumb_mpp
    ox, oy = canvas.attrs["origin_um"]
    iy, ix = np.nonzero(canvas.tissue)
    ax.scatter(
        ox / canvas.thumb_mpp + ix * s,
        oy / canvas.thumb_mpp + iy * s,
        s=max(0.5, (s / 4) ** 2),
        c="tab:green",
        alpha=0.5,
        linewidths=0,
        label=f"{len(iy)} spots predicted",
    )
    xs = ox / canvas.thumb_mpp + np.arange(nx) * s
    ys = oy / canvas.thumb_mpp + np.arange(ny) * s
    ax.contour(xs, ys, canvas.tissue.astype(float), levels=[0.5], colors="tab:blue", linewidths=1.0)
    flag_handles = canvas.draw_flags(ax, legend=False)
    canvas.scalebar(ax)
    ax.set_axis_off()
    handles, _labels = ax.get_legend_handles_labels()
    ax.legend(handles=handles + flag_handles, loc="upper right", fontsize=8)
    area = _fact(meta, "tissue", "area_mm2")
    area_text = f"{area:.2f}" if isinstance(area, (int, float)) else "?"
    facts = (
        f"MPP {meta['mpp']['x']:.4f} µm/px ({_fact(meta, 'mpp', 'source')}); stride {canvas.stride:g} µm, "
        f"spot {canvas.attrs['spot_um']:g} µm, context {canvas.attrs['context_um']:g} µm\n"
        f"tissue {area_text} mm² ({_fact(meta, 'tissue', 'source')}); model {_fact(meta, 'model', 'name')}, "
        f"encoder {_fact(meta, 'encoder', 'name')}"
    )
    ax.set_title(Path(meta["slide"]["path"]).name + canvas.partial_note, fontsize=10)
    fig.text(0.01, 0.01, facts, fontsize=7, va="bottom")
    out = Path(out)
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"{out.parent}: is a file; --out takes a folder for the PNGs")
    require_replaceable([out], "the QC overview of `plot`")
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, out)
    plt.close(fig)
    return out

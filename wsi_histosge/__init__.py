"""wsi-histosge: spatial gene expression from H&E whole-slide images (HisToSGE).

The public API, importable from the package itself::

    import wsi_histosge as hs

    result = hs.infer_slide("slide.svs", "slide.zarr", hs.InferOptions(stride_um=50))
    hs.verify_cube("slide.zarr")
    hs.to_anndata("slide.zarr", "slide.h5ad")

Names are imported on first use (PEP 562), so ``import wsi_histosge`` stays cheap and does not import
torch; the modules (``wsi_histosge.slide``, ``.infer``, ...) hold the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # slides
    "Slide": "slide",
    "open_slide": "slide",
    # one slide, end to end
    "InferOptions": "infer",
    "InferResult": "infer",
    "infer_slide": "infer",
    "verify_cube": "store",
    "to_anndata": "convert",
    "to_qupath": "qupath",
    "to_spatialdata": "sdata",
    "plot_genes": "plot",
    "plot_qc": "plot",
    # models and encoders
    "default_model_path": "model",
    "load_model": "model",
    "create_encoder": "encoders",
    "list_encoders": "encoders",
    # cohorts
    "RunConfig": "cohort",
    "SlideJob": "cohort",
    "collect_jobs": "cohort",
    "run_batch": "cohort",
    "write_report": "report",
    # errors (each also subclasses a builtin) and their exit codes
    "EXIT_CODES": "errors",
    "HistoSGEError": "errors",
    "UsageError": "errors",
    "InputNotFoundError": "errors",
    "SlideFormatError": "errors",
    "CorruptTileError": "errors",
    "MPPMissingError": "errors",
    "NoTissueError": "errors",
    "OutputExistsError": "errors",
    "ModelError": "errors",
    "EncoderWeightsError": "errors",
    "DataFormatError": "errors",
    "CubeIncompleteError": "errors",
    "OutputWriteError": "errors",
    "NoSlidesError": "errors",
    "OutputLockedError": "errors",
    "ObjectStoreError": "errors",
}

# Literal so that linters and type checkers see it; tests/test_public_api.py keeps it equal to _EXPORTS.
__all__ = [
    "EXIT_CODES",
    "CorruptTileError",
    "CubeIncompleteError",
    "DataFormatError",
    "EncoderWeightsError",
    "HistoSGEError",
    "InferOptions",
    "InferResult",
    "InputNotFoundError",
    "MPPMissingError",
    "ModelError",
    "NoSlidesError",
    "NoTissueError",
    "ObjectStoreError",
    "OutputExistsError",
    "OutputLockedError",
    "OutputWriteError",
    "RunConfig",
    "Slide",
    "SlideFormatError",
    "SlideJob",
    "UsageError",
    "__version__",
    "collect_jobs",
    "create_encoder",
    "default_model_path",
    "infer_slide",
    "list_encoders",
    "load_model",
    "open_slide",
    "plot_genes",
    "plot_qc",
    "run_batch",
    "to_anndata",
    "to_qupath",
    "to_spatialdata",
    "verify_cube",
    "write_report",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ does the importing
    from .cohort import RunConfig, SlideJob, collect_jobs, run_batch
    from .convert import to_anndata
    from .encoders import create_encoder, list_encoders
    from .errors import (
        EXIT_CODES,
        CorruptTileError,
        CubeIncompleteError,
        DataFormatError,
        EncoderWeightsError,
        HistoSGEError,
        InputNotFoundError,
        ModelError,
        MPPMissingError,
        NoSlidesError,
        NoTissueError,
        ObjectStoreError,
        OutputExistsError,
        OutputLockedError,
        OutputWriteError,
        SlideFormatError,
        UsageError,
    )
    from .infer import InferOptions, InferResult, infer_slide
    from .model import default_model_path, load_model
    from .plot import plot_genes, plot_qc
    from .qupath import to_qupath
    from .report import write_report
    from .sdata import to_spatialdata
    from .slide import Slide, open_slide
    from .store import verify_cube


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

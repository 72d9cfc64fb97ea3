"""One exception hierarchy for the whole tool.

Every error subclasses :class:`HistoSGEError` *and* the builtin it resembles, so callers can catch
either. Each carries an ``exit_code`` that the CLI returns; the codes are documented in the README
("Failure behaviour") and must not change meaning between releases.
"""

from __future__ import annotations


class HistoSGEError(Exception):
    """Base class. ``str(err)`` is a one-line message that names the file and the fix."""

    exit_code = 1


class UsageError(HistoSGEError, ValueError):
    """Bad options or parameters."""

    exit_code = 2


class InputNotFoundError(HistoSGEError, FileNotFoundError):
    """An input (slide, cube, mask, manifest, model folder, data file) does not exist."""

    exit_code = 3


#: The historical name: every "input not found" is one error, whatever the input.
SlideNotFoundError = InputNotFoundError


class SlideFormatError(HistoSGEError, ValueError):
    """The file is not a slide we can read, or it is truncated/corrupt."""

    exit_code = 4


class MPPMissingError(HistoSGEError, ValueError):
    """The slide carries no (plausible) pixel size and no override was given."""

    exit_code = 5


class NoTissueError(HistoSGEError, ValueError):
    """Tissue detection found nothing to predict on."""

    exit_code = 6


class OutputExistsError(HistoSGEError, FileExistsError):
    """The output path holds something else, or a run with other parameters."""

    exit_code = 7


class ModelError(HistoSGEError, ValueError):
    """A checkpoint or encoder cannot be loaded or does not fit together."""

    exit_code = 8


class EncoderWeightsError(ModelError, FileNotFoundError):
    """Encoder weights are not available offline."""

    exit_code = 8


class CorruptTileError(SlideFormatError):
    """A tile of the slide failed to decode."""

    exit_code = 4


class DataFormatError(HistoSGEError, ValueError):
    """Input data (counts, spot files, AnnData, a cube given to `to-anndata`) is malformed or unsafe."""

    exit_code = 9


class CubeIncompleteError(HistoSGEError, ValueError):
    """A cube is incomplete (no completion marker) or has missing chunks where it should have data."""

    exit_code = 13


class OutputWriteError(HistoSGEError, OSError):
    """Writing the output failed (disk full, quota, permissions); what was written stays resumable."""

    exit_code = 14


class NoSlidesError(HistoSGEError, FileNotFoundError):
    """`batch` found no slides in its inputs (a glob that matches nothing, an empty folder)."""

    exit_code = 12


class OutputLockedError(HistoSGEError, BlockingIOError):
    """Another running process holds the output's lock (a second `infer` or `batch` on the same output)."""

    exit_code = 15


class ObjectStoreError(HistoSGEError, OSError):
    """An object store (s3://, gs://) refused a slide's bytes: no or wrong credentials, no permission, or the
    endpoint cannot be reached. Not a fault of the slide; fix the access and rerun (runs resume)."""

    exit_code = 16


def check_range(flag: str, value: object, lo: float, hi: float, *, integer: bool = False) -> None:
    """UsageError naming ``flag`` unless ``value`` is a finite number (an int when ``integer``) in [lo, hi]."""
    import math

    kind = "an integer" if integer else "a number"
    number = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    # huge ints compare fine but do not convert to float: only floats are checked for finiteness
    finite = not isinstance(value, float) or math.isfinite(value)
    if not number or not finite or not lo <= value <= hi:  # type: ignore[operator]
        raise UsageError(f"{flag} must be {kind} between {lo:g} and {hi:g}, got {value!r}")


EXIT_CODES: dict[int, str] = {
    0: "success (or nothing to do: output already complete)",
    1: "unexpected internal error (rerun with --debug and report it)",
    2: "bad usage or parameters",
    3: "input not found (slide, cube, mask, manifest, model, data)",
    4: "not a readable slide, or a corrupt/truncated slide",
    5: "slide has no pixel size (MPP); pass --mpp",
    6: "no tissue found",
    7: "output exists with other content or other parameters; use --overwrite or another --out",
    8: "model or encoder cannot be loaded, or they do not fit together",
    9: "input data (training data, a cube, a mask, a model's JSON) is malformed or declares unsafe codecs",
    10: "batch: some slides failed (see summary.csv)",
    11: "batch: every slide failed",
    12: "batch: no slides found in the inputs (a glob that matches no file, an empty folder)",
    13: "the cube is incomplete or has missing chunks (verify, to-anndata, plot)",
    14: "writing the output failed (disk full, quota, permissions); free space and rerun to resume",
    15: "another running process holds the output's lock (infer; batch: no slide failed but some are locked)",
    16: "an object store refused or failed a slide read (credentials, permissions, endpoint); fix it and rerun",
    130: "interrupted (Ctrl-C / SIGTERM); rerun to resume",
}

"""What the user chose: one keyword-only object, validated where it is made.

:class:`Options` is shared by :func:`api.segment`, :func:`api.run`, :func:`batch.run_batch`,
the SCT task and the command line, whose flags are built from the fields' metadata
(:func:`flag_specs`). Its postprocessing part resolves, against a model's manifest, into
:class:`PostOptions`, which the manifest's ``postprocess`` section, the sidecar and the
batch resume key all read field by field.

A new postprocessing option is a field of PostOptions (its type and default) and of
Options (its flag), both here, and its step in ``postprocess.py``: nothing else changes.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Literal

from .errors import OptionError

if TYPE_CHECKING:
    from .registry.manifest import ModelSpec

Mode4D = Literal["mean", "each"]
Output = Literal["mask", "probability"]
DEVICES = ("auto", "cpu", "cuda")
METHODS = ("z", "3d")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(vox|mm3)?$")


def parse_size(text: str) -> tuple[float, str]:
    """Parse ``-remove-small`` values: ``'20'``, ``'20vox'`` or ``'15mm3'`` -> (value, unit)."""
    m = _SIZE_RE.match(str(text).strip())
    if not m:
        raise ValueError(f"size must look like 20, 20vox or 15mm3, not {text!r}")
    return float(m.group(1)), m.group(2) or "vox"


def yes_no(text: str) -> bool:
    """Parse SCT's 0|1 flags."""
    if text in ("0", "1"):
        return text == "1"
    raise argparse.ArgumentTypeError(f"expected 0 or 1, not {text!r}")


def _threshold(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError("must be in [0, 1); -thr 0 (the soft map instead of a mask) "
                                         "is an alias of -output probability")
    return v


REPORT_NAME_MAX = 100  # bytes (UTF-8) of a -qc-dataset / -qc-subject name


def check_report_name(value: str, flag: str) -> str:
    """A QC dataset or subject name: shown in the report and part of its file names, so a name, never a path.

    Refused: empty, ``.``, ``..``, a slash or backslash, control characters (NUL, newline...)
    and more than :data:`REPORT_NAME_MAX` bytes.
    """
    import unicodedata

    why = None
    if not isinstance(value, str) or not value.strip():
        why = "is empty"
    elif value in (".", ".."):
        why = "is a folder reference"
    elif "/" in value or "\\" in value:
        why = "holds a path separator"
    elif any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in value):
        why = "holds control characters"
    elif len(value.encode("utf-8", "surrogateescape")) > REPORT_NAME_MAX:
        why = f"is longer than {REPORT_NAME_MAX} bytes"
    if why:
        shown = repr(value if len(value) <= 60 else value[:60] + "...")
        raise OptionError(f"{flag}: {shown} {why}; it must be a plain name (letters, digits, '-', '_'), "
                          "not a path")
    return value


def report_name(flag: str) -> Callable[[str], str]:
    """The argparse type of ``-qc-dataset``/``-qc-subject``: a bad name is a usage error (exit 2)."""
    def parse(text: str) -> str:
        try:
            return check_report_name(text, flag)
        except OptionError as exc:  # argparse names the flag itself
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from None
    return parse


def _whole(minimum: int) -> Callable[[str], int]:
    """A flag's parser for whole numbers >= ``minimum``: refused at parse time (a usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {v}")
        return v
    return parse


def positive_number(text: str) -> float:
    """A flag's parser for finite numbers > 0 (a spacing, a learning rate): refused at parse time."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text}")
    return v


def fraction(text: str) -> float:
    """A flag's parser for a fraction in (0, 1] (nnU-Net's sliding-window step)."""
    v = positive_number(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {text}")
    return v


whole_number = _whole  # for the commands' own flags


def _size(text: str) -> str:
    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _flag(name: str, metavar: str | None, parse: Callable | None, help: str, **kw) -> dict[str, Any]:
    return {"flag": dict(name=name, metavar=metavar, type=parse, help=help, **kw)}


@dataclass(frozen=True)
class PostOptions:
    """Postprocessing, fully resolved: probabilities on the native grid -> a clean mask."""

    threshold: float = 0.5
    method: str = "z"  # "z": follow the cord along z (zfollow.py); "3d": largest 3D object (0.1.0's)
    largest: bool = True
    fill_holes: bool = True
    remove_small: str = "0vox"
    dilate: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"postprocess method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if isinstance(self.dilate, bool) or not isinstance(self.dilate, int) or self.dilate < 0:
            raise ValueError(f"dilate must be a whole number of voxels >= 0, not {self.dilate!r}")
        try:
            parse_size(self.remove_small)
        except ValueError as exc:  # the caller names where the value came from
            raise ValueError(f"remove_small: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class Options:
    """What the user chose; ``None`` means the model manifest's default.

    ``output="probability"`` makes the soft probability map the main output (``-thr 0``,
    as in SCT, is kept as an alias of it). Bad values raise :class:`OptionError`.
    """

    output: Output = field(default="mask", metadata=_flag(
        "-output", None, None, "What the main output file holds: the binary mask, or the ensemble's soft "
        "probability map (float32; -thr 0, as in SCT, is an alias of -output probability). Default: mask.",
        choices=("mask", "probability")))
    threshold: float | None = field(default=None, metadata=_flag(
        "-thr", "<float>", _threshold, "Binarisation threshold on the ensemble probability (default: the model's)."))
    method: str | None = field(default=None, metadata=_flag(
        "-postprocess", None, None, "z: follow the cord along z slice by slice (a centreline through the confident "
        "slices; weaker slices next to them kept with lower thresholds; off-path objects removed); 3d: threshold "
        "and keep the largest 3D connected object, as earlier versions did (default: the model's, z).",
        choices=METHODS))
    largest: bool | None = field(default=None, metadata=_flag(
        "-largest", "<0|1>", yes_no, "With -postprocess 3d: keep only the largest connected object "
                                     "(default: the model's, 1)."))
    fill_holes: bool | None = field(default=None, metadata=_flag(
        "-fill-holes", "<0|1>", yes_no, "Fill holes in each axial slice (default: the model's, 1)."))
    remove_small: str | None = field(default=None, metadata=_flag(
        "-remove-small", "<N[vox|mm3]>", _size, "Remove objects smaller than N voxels or mm3 (default: the model's)."))
    dilate: int | None = field(default=None, metadata=_flag(
        "-dilate", "<int>", _whole(0), "Grow the mask by N voxels in each axial slice, e.g. a margin for motion "
                                 "correction (default: the model's, 0)."))
    mode_4d: Mode4D = field(default="mean", metadata=_flag(
        "-4d", None, None, "4D input: segment the temporal mean (mean, 3D mask) or every volume (each, 4D mask).",
        choices=("mean", "each")))
    tta: bool | None = field(default=None, metadata=_flag(
        "-tta", "<0|1>", yes_no, "Flip (mirroring) test-time augmentation. Default: the model's: 1 for this "
                                 "engine's models; 0 for imported nnU-Net models, as in SCT (-tta 1 mirrors them "
                                 "as SCT's -test-time-aug does). 0 is faster."))
    device: str = field(default="auto", metadata=_flag(
        "-device", None, None, "Where to run (default: auto; cuda needs onnxruntime-gpu).", choices=DEVICES))
    localise: bool = field(default=True, metadata=_flag(
        "-roi", "<0|1>", yes_no, "Find the cord with a quick first pass, then run the ensemble on a region around "
                                 "it (default 1; 0 runs the ensemble on the whole field, slower)."))
    threads: int | None = field(default=None, metadata=_flag(
        "-threads", "<int>", _whole(1), "CPU threads for inference (default: all CPUs available to this process)."))
    # a label file, a label image or (i, j, k, value) voxel points: prompts.read_prompts
    prompts: Any = field(default=None, metadata=_flag(
        "-prompt", "<file>", None, "Points that correct the mask: a label image on the input's grid (as "
        "sct_label_utils -create-viewer or FSLeyes write it), 1 on the cord where a slice was missed or wrong, "
        "2 on an object that is not cord. Slices without a point are segmented as without this option "
        "(docs/postprocessing.md)."))

    def __post_init__(self):
        if self.threshold is not None and float(self.threshold) == 0:  # SCT's spelling of the soft map
            object.__setattr__(self, "output", "probability")
            object.__setattr__(self, "threshold", None)
        if self.output not in ("mask", "probability"):
            raise OptionError(f"output must be 'mask' or 'probability', not {self.output!r}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise OptionError(f"threshold {self.threshold} must be in (0, 1) (output='probability' for the soft map)")
        if self.mode_4d not in ("mean", "each"):
            raise OptionError(f"-4d must be 'mean' or 'each', not {self.mode_4d!r}")
        if self.device not in DEVICES:
            raise OptionError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise OptionError(f"threads must be at least 1, not {self.threads}")
        try:
            PostOptions(**{k: v for k, v in self._post_choices().items() if k != "threshold"})
        except ValueError as exc:
            raise OptionError(str(exc)) from None

    def _post_choices(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(PostOptions) if getattr(self, f.name) is not None}

    def post(self, spec: ModelSpec) -> PostOptions:
        """The postprocessing to run: these choices over the model's defaults."""
        return replace(spec.postprocess, **self._post_choices())

    def replace(self, **changes) -> Options:
        return replace(self, **changes)

    def tta_for(self, spec: ModelSpec) -> bool:
        """Whether to run test-time flips for ``spec``: the choice made, else the model kind's default."""
        return spec.backend.tta_default if self.tta is None else bool(self.tta)

    def settings(self, spec: ModelSpec | None = None) -> dict[str, Any]:
        """The choices that change a result (not where or how fast it runs): batch's resume key.

        With ``spec``, test-time flips are resolved against the model, as they will run.
        """
        tta = self.tta_for(spec) if spec is not None else self.tta
        d = {"threshold": self.threshold, "mode_4d": self.mode_4d, "tta": tta}
        # later fields only when set, so that earlier resume keys still match
        d.update({f.name: getattr(self, f.name) for f in fields(PostOptions)
                  if f.name != "threshold" and getattr(self, f.name) is not None})
        # always: masks made before z-following became the default must not pass as up to date
        d.setdefault("method", None)
        if not self.localise:
            d["localise"] = False
        if self.prompts is not None:
            d["prompts"] = str(self.prompts)
        return d


def flag_specs() -> list[tuple[str, dict[str, Any]]]:
    """(field name, argparse keywords) for every Options field that has a command-line flag."""
    return [(f.name, dict(f.metadata["flag"])) for f in fields(Options) if "flag" in f.metadata]

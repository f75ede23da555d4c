"""SCT-style argument parsing: single-dash flags, MANDATORY/OPTIONAL/MISC groups, one-line errors."""
from __future__ import annotations

import argparse
import logging
import sys
import unicodedata
from typing import NoReturn

from ..options import yes_no  # noqa: F401 (the 0|1 flags' parser, for the commands)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object) -> str:
    """``text`` with control characters (newline, NUL, escape, line separators...) escaped.

    A file name may hold any of them; a message that names it must stay one line and must
    not let the name drive the terminal.
    """
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() or unicodedata.category(c) == "Zs"
                   else _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in s)


class _PrintableFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit 2, like SCT's."""

    def __init__(self, prog: str, description: str, *, version_flags: bool = True, **kw):
        super().__init__(prog=prog, description=description, add_help=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        self.mandatory = self.add_argument_group("MANDATORY ARGUMENTS")
        self.optional = self.add_argument_group("OPTIONAL ARGUMENTS")
        self.misc = self.add_argument_group("MISC ARGUMENTS")
        self.misc.add_argument("-h", "-help", "--help", action="help", help="Show this help message and exit.")
        if version_flags:  # off where -version is the version of a model the command makes
            # spelled out so that argparse matches it whole instead of reading "-v ersion"
            self.misc.add_argument("-version", "--version", action=_Version, nargs=0,
                                   help="Print the package version, the default model and ONNX Runtime's "
                                        "version and providers, and exit.")
        self.misc.add_argument("-v", metavar="<int>", type=int, choices=(0, 1, 2), default=1,
                               help="Verbosity: 0 = errors only, 1 = normal (default), 2 = debug.")

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {printable(message)} (see {self.prog} -h)\n")
        raise SystemExit(2)


def version_text() -> str:
    """The package version, the default model (name@version) and ONNX Runtime's version and providers."""
    from .. import __version__
    from ..errors import EpiSegError
    from ..registry import store

    try:
        model = store.resolve(store.DEFAULT_MODEL).ref
    except EpiSegError as exc:
        model = f"{store.DEFAULT_MODEL} (not available: {exc})"
    try:
        import onnxruntime as ort

        runtime = f"onnxruntime {ort.__version__} (providers: {', '.join(ort.get_available_providers())})"
    except ImportError as exc:
        runtime = f"onnxruntime not importable ({exc})"
    return f"sct_deepseg_epi {__version__}\ndefault model: {model}\n{runtime}\n"


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(version_text())
        parser.exit(0)


def add_engine_flags(group, *, skip: tuple[str, ...] = (), change: dict[str, dict] | None = None) -> None:
    """``-model`` and a flag per option of :class:`~sct_deepseg_epi.options.Options`, for the commands
    that segment; ``skip`` leaves options out, ``change`` overrides a flag's argparse keywords."""
    from ..options import flag_specs

    group.add_argument("-model", metavar="<name[@version]>", default="seg_sc_epi",
                       help="Model to use (default: seg_sc_epi, latest version). A model folder also works.")
    for name, kw in flag_specs():
        if name not in skip:
            kw = {**kw, **(change or {}).get(name, {})}
            group.add_argument(kw.pop("name"), dest=name, default=None, **{k: v for k, v in kw.items() if v is not None})


def options_from_args(args: argparse.Namespace, parser: Parser | None = None):
    """The Options that the parsed flags of :func:`add_engine_flags` choose (unset flags: the defaults).

    With ``parser``, a value or a combination of flags that Options refuses is a usage error
    (exit 2), like any other bad flag, and so is an explicit ``-output mask`` with ``-thr 0``
    (SCT's spelling of the soft map), which would otherwise silently turn the mask into a map.
    """
    from ..errors import OptionError
    from ..options import Options, flag_specs

    if parser is not None and getattr(args, "output", None) == "mask" and getattr(args, "threshold", None) == 0:
        parser.error("-output mask and -thr 0 (the soft probability map, an alias of -output probability) "
                     "contradict each other; give one of them")
    try:
        return Options(**{name: getattr(args, name) for name, _ in flag_specs()
                          if getattr(args, name, None) is not None})
    except OptionError as exc:
        if parser is None:
            raise
        parser.error(str(exc))


def setup_logging(verbosity: int) -> None:
    level = {0: logging.ERROR, 1: logging.INFO, 2: logging.DEBUG}[verbosity]
    root = logging.getLogger("sct_deepseg_epi")
    root.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    # debug output (-v 2) keeps its tracebacks on several lines; every other message is one line
    handler.setFormatter(_PrintableFormatter("%(levelname)s: %(message)s") if verbosity < 2
                         else logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False

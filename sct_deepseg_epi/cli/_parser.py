"""SCT-style argument parsing: single-dash flags, MANDATORY/OPTIONAL/MISC groups, one-line errors."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from ..options import yes_no  # noqa: F401 (the 0|1 flags' parser, for the commands)


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
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} -h)\n")
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


def options_from_args(args: argparse.Namespace):
    """The Options that the parsed flags of :func:`add_engine_flags` choose (unset flags: the defaults)."""
    from ..options import Options, flag_specs

    return Options(**{name: getattr(args, name) for name, _ in flag_specs()
                      if getattr(args, name, None) is not None})


def setup_logging(verbosity: int) -> None:
    level = {0: logging.ERROR, 1: logging.INFO, 2: logging.DEBUG}[verbosity]
    root = logging.getLogger("sct_deepseg_epi")
    root.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbosity < 2
                                           else "%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False

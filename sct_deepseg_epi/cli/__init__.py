"""Command-line entry point: ``sct_deepseg_epi [COMMAND] ...``.

Without a command name the arguments go to segmentation (SCT's ``-i IN`` style); a
command name as the first argument picks a sub-tool. Each sub-tool is a module with
``get_parser()`` and ``main(argv)``; only the chosen one is imported, so ``-h`` is fast.
Library errors (EpiSegError) become one line on stderr (control characters escaped) and exit
status 1; usage errors exit 2.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

# command name -> module (relative to this package) and one-line summary
COMMANDS: dict[str, tuple[str, str]] = {
    "segment": (".segment", "segment a 3D or 4D EPI image (the default command)"),
    "demo": (".demo", "build a synthetic EPI phantom, segment it and print the Dice"),
    "train": (".train", "train or fine-tune a model on labelled data and export it"),
    "evaluate": (".evaluate", "compare predicted masks with reference masks"),
    "batch": (".batch", "segment every BOLD run of a BIDS dataset"),
    "import-nnunet": (".import_nnunet", "convert an nnUNet v2 model to an ONNX model of this engine"),
    "moco-mask": (".moco_mask", "build the cylinder mask that sct_fmri_moco -m expects"),
    "fmri-pipeline": (".fmri_pipeline", "mean -> segmentation -> moco -> PAM50 registration with SCT"),
}


def commands_epilog() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "commands (sct_deepseg_epi COMMAND -h for each):\n" + "\n".join(lines)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that the same clean-up runs (temporaries removed)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


def handle_signals() -> dict:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` where they would kill the process outright.

    A handler someone else installed, or an ignored signal (``nohup``), is left alone.
    Returns the handlers replaced, for :func:`restore_signals`.
    """
    import signal
    import threading

    replaced: dict = {}
    if threading.current_thread() is not threading.main_thread():
        return replaced
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            replaced[sig] = signal.signal(sig, _raise_terminated)
    return replaced


def restore_signals(replaced: dict) -> None:
    import signal

    for sig, handler in replaced.items():
        signal.signal(sig, handler)


def call(main_fn: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Call a command's main(), turning library errors into one line and exit 1.

    Ctrl-C exits with 130, SIGTERM/SIGHUP with 128 + the signal number, after the same
    clean-up as an error: no temporary or partial output is left.
    """
    from ..errors import EpiSegError
    from ._parser import printable

    try:
        return int(main_fn(argv) or 0)
    except EpiSegError as exc:
        sys.stderr.write(f"error: {printable(exc)}\n")
        return 1
    except BaseException as exc:
        interrupt = _interruption(exc)
        if interrupt is None:
            raise
        if isinstance(interrupt, Terminated):
            import signal

            sys.stderr.write(f"interrupted by {signal.Signals(interrupt.signum).name}\n")
            return 128 + interrupt.signum
        sys.stderr.write("interrupted\n")
        return 130


def _interruption(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C or signal behind ``exc``: a library may wrap it (onnxruntime's import turns it into
    'ImportError: initialization failed')."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run(module: str, argv: list[str]) -> int:
    """Run one command module's main() through :func:`call`."""
    return call(importlib.import_module(module, __name__).main, argv)


def main(argv: Sequence[str] | None = None) -> int:
    replaced = handle_signals()
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        if args and args[0] in COMMANDS:
            return run(COMMANDS[args[0]][0], args[1:])
        return run(COMMANDS["segment"][0], args)
    finally:
        restore_signals(replaced)  # an embedding program (or a test run) keeps its own behaviour

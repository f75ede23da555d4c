"""The ``seg_sc_epi`` task of the Spinal Cord Toolbox (SCT), run by this package's engine.

SCT 7.x has no plugin mechanism: ``sct_deepseg`` builds one sub-command per entry of the
``TASKS`` dict in ``spinalcordtoolbox/deepseg/models.py`` (reading ``MODELS`` for each
task's models), and every ``sct_*`` console script re-runs ``scripts/<name>.py`` in a child
interpreter. So registration has to happen inside that child, at the moment SCT's registry
module is imported. How it works:

1. Installing the package puts ``sct_deepseg_epi-sct.pth`` in site-packages (see setup.py).
   Python runs its one line at start-up: it imports this module (standard library only) and
   calls :func:`install_import_hook`, which puts a finder at the front of ``sys.meta_path``.
   The finder compares each imported name with ``spinalcordtoolbox.deepseg.models`` and does
   nothing else, so start-up costs well under a millisecond and nothing changes where SCT is
   absent. ``SCT_DEEPSEG_EPI_NO_SCT_HOOK=1`` turns the hook off.
2. When SCT imports ``spinalcordtoolbox.deepseg.models``, the module runs as usual and then
   :func:`register` adds one task (``seg_sc_epi``) and one model entry (``sct_deepseg_epi``)
   of the shapes SCT's parser reads; nothing of SCT's own is changed, except that SCT 6.x's
   task of the same name is replaced by ours (SCT 7.x calls its own EPI task ``sc_epi``).
3. When the process is ``sct_deepseg`` and its arguments select our task, in either syntax
   (``sct_deepseg seg_sc_epi ...`` or SCT 6.x's ``sct_deepseg -task seg_sc_epi ...``), SCT's
   ``init_sct()`` runs (banner, logging) and then our command line instead of SCT's ``main``:
   the ONNX ensemble never reaches SCT's inference code. Every other task, and ``-task``
   with any other name, goes to SCT untouched.

``pip uninstall sct_deepseg_epi`` removes the ``.pth`` file with the package, and SCT is
exactly as before. The ``spinalcordtoolbox.deepseg.tasks`` entry point (:func:`sct_task`)
describes the same task for an SCT that one day discovers tasks by entry point.

Only the standard library is imported at module level: this module is loaded at the start
of every Python process of the environment.
"""
from __future__ import annotations

import os
import sys

TASK = "seg_sc_epi"
MODEL = "sct_deepseg_epi"
TARGET = "spinalcordtoolbox.deepseg.models"
ENTRY_POINT_GROUP = "spinalcordtoolbox.deepseg.tasks"
DISABLE_ENV = "SCT_DEEPSEG_EPI_NO_SCT_HOOK"
PTH_NAME = "sct_deepseg_epi-sct.pth"
_MARK = "_sct_deepseg_epi"  # attribute/key marking what we added, so that work is never done twice

DESCRIPTION = "Spinal cord segmentation on gradient-echo EPI (BOLD fMRI), 3D or 4D, by sct_deepseg_epi"
LONG_DESCRIPTION = (
    "Segments the spinal cord in axial gradient-echo EPI with an ensemble of 2D networks run by ONNX Runtime "
    "(package sct_deepseg_epi). 4D series are segmented on their temporal mean (-4d mean) or volume by volume "
    "(-4d each). Writes IN_seg.nii.gz on the input's own grid and a JSON sidecar with the model, its checksums "
    "and the options used. The ensemble disagreement (-disagreement 1) shows where the mask is uncertain. "
    "This task is added by the sct_deepseg_epi package; `pip uninstall sct_deepseg_epi` removes it. SCT's own "
    "EPI model stays available as the task `sc_epi`."
)
URL = "https://pypi.org/project/sct-deepseg-epi/"
CITATION = ("sct_deepseg_epi: spinal cord segmentation for gradient-echo EPI. If you use it, cite the Spinal "
            "Cord Toolbox (De Leener et al., NeuroImage 2017) and the model named in the JSON sidecar.")


# --- start-up hook ----------------------------------------------------------------------------

class _Loader:
    """Runs SCT's module as usual, then adds our task to it."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        on_models_imported(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for inspect and tracebacks
        return getattr(self._loader, name)


class _Finder:
    """A ``sys.meta_path`` entry that reacts to one module name only."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module") and not isinstance(spec.loader, _Loader):
            spec.loader = _Loader(spec.loader)
        return spec


def install_import_hook() -> None:
    """Called by the ``.pth`` file at interpreter start-up; idempotent and cheap."""
    if os.environ.get(DISABLE_ENV):
        return
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    models = sys.modules.get(TARGET)
    if models is not None:  # already imported (an embedding host): register right away
        on_models_imported(models)
        return
    sys.meta_path.insert(0, _Finder())


def on_models_imported(models) -> None:
    """Register the task; then, in an ``sct_deepseg`` process asked for our task, take it over.

    A failure here must never break SCT: it is reported in one line and SCT goes on without
    our task.
    """
    try:
        register(models)
    except Exception as exc:  # noqa: BLE001 - SCT must keep working whatever happens here
        sys.stderr.write(f"sct_deepseg_epi: could not add the {TASK} task to SCT ({type(exc).__name__}: {exc}); "
                         "SCT runs without it\n")
        return
    _take_over_if_ours()


# --- registration -----------------------------------------------------------------------------

def task_entry() -> dict:
    """Our entry of SCT's ``TASKS`` (same keys as SCT's own entries)."""
    return {
        "description": DESCRIPTION,
        "long_description": LONG_DESCRIPTION,
        "url": URL,
        "models": [MODEL],
        "citation": CITATION,
        "group": "spinal_cord",
        _MARK: True,
    }


def model_entry() -> dict:
    """Our entry of SCT's ``MODELS``: what SCT's parser and listings read.

    ``framework`` is neither ``nnunetv2`` nor ``ivadomed``: SCT never runs this model itself.
    ``url`` is empty and ``default`` false, so SCT's installers leave it alone; our own
    ``-install`` downloads it.
    """
    return {
        "url": [],
        "description": "ONNX ensemble for spinal cord segmentation on EPI (run by sct_deepseg_epi)",
        "contrasts": ["bold"],
        "framework": "sct_deepseg_epi",
        "thr": 0.5,
        "default": False,
        _MARK: True,
    }


def sct_task() -> dict:
    """The entry point ``spinalcordtoolbox.deepseg.tasks:seg_sc_epi``: everything SCT would need."""
    return {"name": TASK, "task": task_entry(), "models": {MODEL: model_entry()}, "main": run_task}


def register(models) -> None:
    """Add our task and model to an imported ``spinalcordtoolbox.deepseg.models``; idempotent.

    Also makes SCT's "installed" colour in ``sct_deepseg -h`` tell the truth for our task (SCT
    recognises only its own file layouts), and points our model store at SCT's models folder
    (``$SCT_DIR/data/deepseg_models/sct_deepseg_epi``) unless SCT_DEEPSEG_EPI_MODELS says otherwise.
    """
    if getattr(models, _MARK, False):
        return
    models.MODELS[MODEL] = model_entry()
    models.TASKS[TASK] = task_entry()
    folder = os.path.normpath(models.folder(MODEL))
    os.environ.setdefault("SCT_DEEPSEG_EPI_MODELS", folder)
    sct_is_valid = models.is_valid

    def is_valid(path_models):
        paths = path_models if isinstance(path_models, list) else [path_models]
        if paths and all(os.path.normpath(str(p)) == folder for p in paths):
            return model_available()
        return sct_is_valid(path_models)

    is_valid.__wrapped__ = sct_is_valid
    is_valid.__doc__ = sct_is_valid.__doc__
    models.is_valid = is_valid
    setattr(models, _MARK, True)


def model_available() -> bool:
    """True when the default model's files are on disk (checksums are checked when it runs)."""
    try:
        from .registry import store

        return store.is_complete(store.resolve(store.DEFAULT_MODEL))
    except Exception:  # noqa: BLE001 - a listing must not fail because of a broken model folder
        return False


# --- running the task -------------------------------------------------------------------------

def task_argv(argv: list[str]) -> list[str] | None:
    """Our task's own arguments if ``sct_deepseg``'s arguments select it, else None.

    ``['seg_sc_epi', '-i', 'x']`` (SCT 7.x) and ``['-task', 'seg_sc_epi', '-i', 'x']`` (SCT 6.x,
    also ``-task=seg_sc_epi``) both give ``['-i', 'x']``.
    """
    if argv and argv[0] == TASK:
        return list(argv[1:])
    for i, arg in enumerate(argv):
        if arg == "-task" and i + 1 < len(argv) and argv[i + 1] == TASK:
            return list(argv[:i]) + list(argv[i + 2:])
        if arg == f"-task={TASK}":
            return list(argv[:i]) + list(argv[i + 1:])
    return None


def _is_sct_deepseg(module) -> bool:
    path = getattr(module, "__file__", None) or ""
    return os.path.basename(path) == "sct_deepseg.py" and os.path.basename(os.path.dirname(path)) == "scripts"


def _take_over_if_ours() -> None:
    """In ``sct_deepseg`` run for our task: after SCT's ``init_sct()``, run our command and exit."""
    main = sys.modules.get("__main__")
    if main is None or not _is_sct_deepseg(main):
        return
    argv = task_argv(sys.argv[1:])
    if argv is None:
        return
    sct_init = getattr(main, "init_sct", None)
    if not callable(sct_init):  # an SCT whose script imports init_sct later: run now
        raise SystemExit(run_task(argv))
    if getattr(sct_init, _MARK, False):
        return

    def init_sct_then_run_task(*args, **kwargs):
        sct_init(*args, **kwargs)
        raise SystemExit(run_task(argv))

    setattr(init_sct_then_run_task, _MARK, True)
    main.init_sct = init_sct_then_run_task


def task_help() -> str:
    return f"{DESCRIPTION}\n\n{LONG_DESCRIPTION}\n\n## Reference\n{CITATION}\n\nProject URL: {URL}\n"


def run_task(argv: list[str], prog: str = f"sct_deepseg {TASK}") -> int:
    """Run the task with this package's segmentation command line; returns the exit status."""
    from .cli import call, segment

    parser = segment.get_parser(prog=prog, description=task_help(), epilog="")
    return call(lambda args: segment.main(args, parser=parser), list(argv))

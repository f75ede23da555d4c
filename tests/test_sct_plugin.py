"""Registration of the seg_sc_epi task in SCT.

CI has no SCT: most tests run SCT's ``sct_deepseg`` script from a faithful stand-in
(``tests/sct_standin``) in a child interpreter, the way SCT's launcher does, with the
package's ``.pth`` start-up hook made active through ``site.addsitedir``. Tests marked
``sct`` run against a real SCT and are skipped where ``sct_deepseg`` is not on PATH.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import pytest

from conftest import REPO, blob_image, make_model_folder
from sct_deepseg_epi import sct_plugin

STANDIN = Path(__file__).resolve().parent / "sct_standin"
SCRIPT = STANDIN / "spinalcordtoolbox" / "scripts" / "sct_deepseg.py"
PTH_SOURCE = REPO / "sct_deepseg_epi" / "_sct_startup.pth"


@pytest.fixture
def site_with_hook(tmp_path) -> Path:
    """A folder holding the package's .pth file, as site-packages would."""
    d = tmp_path / "site"
    d.mkdir()
    shutil.copy(PTH_SOURCE, d / sct_plugin.PTH_NAME)
    return d


def child(args: list[str], *, hook: Path | None, cwd: Path, code: str | None = None, env: dict | None = None):
    """Run the stand-in's sct_deepseg.py as SCT's launcher does: ``python scripts/sct_deepseg.py ARGS``.

    ``hook``: a site folder with our .pth (None: the hook is disabled, as after pip uninstall).
    """
    boot = "import site, sys, runpy\n"
    if hook is not None:
        boot += f"site.addsitedir({str(hook)!r})\n"
    boot += code if code is not None else f"sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]\nrunpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(STANDIN), str(REPO)])
    e["SCT_DIR"] = str(cwd / "sct")
    e["COLUMNS"] = "100"
    e.pop("SCT_DEEPSEG_EPI_MODELS", None)
    if hook is None:
        e[sct_plugin.DISABLE_ENV] = "1"
    else:
        e.pop(sct_plugin.DISABLE_ENV, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", boot] + args, cwd=cwd, env=e, capture_output=True, text=True, timeout=60)


def test_task_argv_both_syntaxes():
    assert sct_plugin.task_argv(["seg_sc_epi", "-i", "a.nii.gz"]) == ["-i", "a.nii.gz"]
    assert sct_plugin.task_argv(["-task", "seg_sc_epi", "-i", "a.nii.gz"]) == ["-i", "a.nii.gz"]
    assert sct_plugin.task_argv(["-i", "a.nii.gz", "-task", "seg_sc_epi"]) == ["-i", "a.nii.gz"]
    assert sct_plugin.task_argv(["-task=seg_sc_epi", "-i", "a.nii.gz"]) == ["-i", "a.nii.gz"]
    # anything else is SCT's
    assert sct_plugin.task_argv(["sc_epi", "-i", "a.nii.gz"]) is None
    assert sct_plugin.task_argv(["-task", "sc_epi"]) is None
    assert sct_plugin.task_argv(["-h"]) is None
    assert sct_plugin.task_argv([]) is None


def _fresh_standin_models():
    """A private copy of the stand-in's models module, loaded without any import hook."""
    sys.path.insert(0, str(STANDIN))
    try:
        spec = importlib.util.spec_from_file_location("standin_models", STANDIN / "spinalcordtoolbox/deepseg/models.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(STANDIN))
    return module


@pytest.fixture
def private_environ(monkeypatch):
    """register() sets SCT_DEEPSEG_EPI_MODELS: keep that out of the test process."""
    env = dict(os.environ)
    env.pop("SCT_DEEPSEG_EPI_MODELS", None)
    monkeypatch.setattr(os, "environ", env)
    return env


def test_register_adds_one_task_and_one_model(private_environ):
    models = _fresh_standin_models()
    before_tasks = {k: dict(v) for k, v in models.TASKS.items()}
    before_models = {k: dict(v) for k, v in models.MODELS.items()}
    sct_is_valid = models.is_valid
    sct_plugin.register(models)
    sct_plugin.register(models)  # idempotent
    assert set(models.TASKS) - set(before_tasks) == {"seg_sc_epi"}
    assert set(models.MODELS) - set(before_models) == {"sct_deepseg_epi"}
    assert all(models.TASKS[k] == v for k, v in before_tasks.items())  # SCT's own entries untouched
    assert all(models.MODELS[k] == v for k, v in before_models.items())
    task = models.TASKS["seg_sc_epi"]
    for key in ("description", "long_description", "url", "models", "citation"):
        assert task[key]
    # what SCT's parser reads for every model of every task
    for m in task["models"]:
        entry = models.MODELS[m]
        assert {"thr", "framework", "url", "contrasts", "default"} <= set(entry)
        assert entry["framework"] not in ("nnunetv2", "ivadomed") and entry["default"] is False
    # is_valid: SCT's folders go to SCT's own function, ours is answered by our store
    assert models.is_valid.__wrapped__ is sct_is_valid
    assert models.is_valid(models.folder("model_seg_sc_epi_nnunet")) is False
    assert os.environ["SCT_DEEPSEG_EPI_MODELS"] == models.folder("sct_deepseg_epi")
    assert models.is_valid([models.folder("sct_deepseg_epi")]) is sct_plugin.model_available()


def test_register_replaces_sct6_task_of_the_same_name(private_environ):
    models = _fresh_standin_models()
    models.TASKS["seg_sc_epi"] = dict(models.TASKS.pop("sc_epi"))  # SCT 6.x's name for its own EPI task
    sct_plugin.register(models)
    assert models.TASKS["seg_sc_epi"]["models"] == ["sct_deepseg_epi"]


def test_a_failing_registration_leaves_sct_alone(capsys):
    broken = SimpleNamespace(TASKS={}, MODELS={})  # no folder(), no is_valid()
    sct_plugin.on_models_imported(broken)
    assert "could not add the seg_sc_epi task to SCT" in capsys.readouterr().err


def test_startup_hook_is_inert_without_sct(site_with_hook, tmp_path):
    code = ("import json, sys\n"
            "hooks = [type(f).__name__ for f in sys.meta_path if type(f).__module__ == 'sct_deepseg_epi.sct_plugin']\n"
            "heavy = [m for m in ('numpy', 'nibabel', 'onnxruntime', 'sct_deepseg_epi.api') if m in sys.modules]\n"
            "print(json.dumps({'hooks': hooks, 'heavy': heavy}))\n")
    r = child([], hook=site_with_hook, cwd=tmp_path, code=code, env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '{"hooks": ["_Finder"], "heavy": []}'
    r = child([], hook=None, cwd=tmp_path, code=code, env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '{"hooks": [], "heavy": []}'


def test_help_lists_the_task_and_nothing_else_changes(site_with_hook, tmp_path):
    without = child(["-h"], hook=None, cwd=tmp_path)
    with_hook = child(["-h"], hook=site_with_hook, cwd=tmp_path)
    assert without.returncode == with_hook.returncode == 0, with_hook.stderr
    assert "seg_sc_epi" not in without.stdout
    added = [line for line in with_hook.stdout.splitlines() if line not in without.stdout.splitlines()]
    assert len(added) == 1 and "seg_sc_epi" in added[0] and sct_plugin.DESCRIPTION in added[0]
    assert without.stdout == child(["-h"], hook=None, cwd=tmp_path).stdout  # uninstalled: byte-identical


@pytest.mark.parametrize("args", [["sc_epi", "-i", "x.nii.gz"], ["spinalcord", "-i", "x.nii.gz", "-test-time-aug"],
                                  ["-task", "sc_epi"], ["-task"]])
def test_other_tasks_and_flags_are_sct_s(site_with_hook, tmp_path, args):
    without = child(args, hook=None, cwd=tmp_path)
    with_hook = child(args, hook=site_with_hook, cwd=tmp_path)
    assert (with_hook.returncode, with_hook.stdout, with_hook.stderr) == (without.returncode, without.stdout, without.stderr)


@pytest.fixture
def epi_and_model(tmp_path):
    img, _ = blob_image(n_volumes=3, axcodes="LPI")
    nib.save(img, str(tmp_path / "bold.nii.gz"))
    return tmp_path / "bold.nii.gz", make_model_folder(tmp_path / "models" / "tiny" / "1.0.0")


@pytest.mark.parametrize("syntax", [["seg_sc_epi"], ["-task", "seg_sc_epi"]])
def test_task_runs_our_engine(site_with_hook, tmp_path, epi_and_model, syntax):
    bold, model = epi_and_model
    r = child(syntax + ["-i", bold.name, "-model", str(model), "-4d", "mean"], hook=site_with_hook, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Spinal Cord Toolbox" in r.stdout  # SCT's init_sct() ran first
    assert "SCT main" not in r.stdout  # SCT's own pipeline never saw our model
    seg = nib.load(str(tmp_path / "bold_seg.nii.gz"))
    assert seg.shape == nib.load(str(bold)).shape[:3] and seg.get_fdata().sum() > 0
    assert (tmp_path / "bold_seg.json").is_file()


def test_task_help_and_errors(site_with_hook, tmp_path):
    r = child(["seg_sc_epi", "-h"], hook=site_with_hook, cwd=tmp_path)
    assert r.returncode == 0
    assert "usage: sct_deepseg seg_sc_epi" in r.stdout and "-4d" in r.stdout and sct_plugin.CITATION[:40] in r.stdout
    r = child(["seg_sc_epi", "-i", "missing.nii.gz", "-model", str(tmp_path)], hook=site_with_hook, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "missing.nii.gz" in r.stderr
    r = child(["seg_sc_epi", "-bogus"], hook=site_with_hook, cwd=tmp_path)
    assert r.returncode == 2 and "sct_deepseg seg_sc_epi: error" in r.stderr


def test_launcher_runs_the_task_in_a_child(tmp_path, epi_and_model):
    """Through the launcher, the grandchild interpreter gets the hook from the installed .pth only."""
    files = _installed_files()
    if not any(f.name == sct_plugin.PTH_NAME for f in files):
        pytest.skip("the package is not installed with its .pth start-up file in this environment")
    bold, model = epi_and_model
    code = ("import sys\nsys.argv = ['sct_deepseg'] + sys.argv[1:]\n"
            "from spinalcordtoolbox.compat.launcher import main\nsys.exit(main())\n")
    r = child(["seg_sc_epi", "-i", bold.name, "-model", str(model)], hook=None, cwd=tmp_path, code=code,
              env={sct_plugin.DISABLE_ENV: ""})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bold_seg.nii.gz").is_file()


def _installed_dist():
    """The installed distribution (not a source tree's egg-info) if it carries the .pth file."""
    for dist in importlib.metadata.distributions(name="sct_deepseg_epi"):
        if any(Path(str(f)).name == sct_plugin.PTH_NAME for f in dist.files or []):
            return dist
    return None


def _installed_files() -> list[Path]:
    dist = _installed_dist()
    return [Path(str(f)) for f in dist.files] if dist else []


def test_installed_metadata_has_pth_and_entry_point():
    dist = _installed_dist()
    if dist is None:
        pytest.skip("the package is not installed (or was installed before its .pth existed)")
    pth = [f for f in dist.files if Path(str(f)).name == sct_plugin.PTH_NAME]
    assert Path(str(dist.locate_file(pth[0]))).read_text() == PTH_SOURCE.read_text()
    eps = [ep for ep in dist.entry_points if ep.group == sct_plugin.ENTRY_POINT_GROUP]
    assert [ep.name for ep in eps] == ["seg_sc_epi"]
    task = eps[0].load()()
    assert task["name"] == "seg_sc_epi" and set(task["models"]) == {"sct_deepseg_epi"} and callable(task["main"])


# --- against a real SCT ---------------------------------------------------------------------

needs_sct = pytest.mark.skipif(shutil.which("sct_deepseg") is None, reason="sct_deepseg (a real SCT) is not on PATH")


def _sct(args, cwd):
    env = dict(os.environ, COLUMNS="120")
    env.pop("SCT_DEEPSEG_EPI_MODELS", None)
    return subprocess.run(["sct_deepseg"] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.sct
@needs_sct
def test_real_sct_lists_and_runs_the_task(tmp_path, epi_and_model):
    bold, model = epi_and_model
    h = _sct(["-h"], tmp_path)
    assert h.returncode == 0 and "seg_sc_epi" in h.stdout and "sc_epi " in h.stdout
    for syntax in (["seg_sc_epi"], ["-task", "seg_sc_epi"]):
        (tmp_path / "bold_seg.nii.gz").unlink(missing_ok=True)
        r = _sct(syntax + ["-i", bold.name, "-model", str(model)], tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (tmp_path / "bold_seg.nii.gz").is_file()
    r = _sct(["-task", "sc_epi"], tmp_path)
    assert r.returncode == 0 and "deprecated" in r.stdout  # SCT's message for every other name

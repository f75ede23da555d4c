"""``sct_deepseg_epi batch``: in-process through main(argv), plus two real concurrent processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import pytest
from conftest import blob_image
from test_batch import make_dataset as make_bids
from test_batch import summary_rows as rows

from sct_deepseg_epi.cli import main

RUNS = ("sub-01/func/sub-01_task-rest_bold.nii.gz", "sub-02/func/sub-02_task-rest_run-1_bold.nii.gz",
        "sub-02/func/sub-02_task-motor_run-1_bold.nii.gz")


def make_dataset(root: Path, runs=RUNS, description: bool = True) -> Path:
    return make_bids(root, runs, n_volumes=2, description=description)


def test_batch_cli_success_then_resume(tiny_model, tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    assert main(["batch", str(ds), "-model", "tiny", "-participant-label", "sub-02", "-task-label", "rest"]) == 0
    err = capsys.readouterr().err
    assert "[1/1] sub-02/func/sub-02_task-rest_run-1_bold.nii.gz done" in err   # plain lines off a terminal
    assert "1 run(s): 1 done" in err
    deriv = ds / "derivatives" / "sct_deepseg_epi"
    assert list(rows(deriv)) == ["sub-02/func/sub-02_task-rest_run-1_bold.nii.gz"]
    assert (deriv / "sub-02/func/sub-02_task-rest_run-1_desc-spinalcord_mask.nii.gz").is_file()
    # the whole dataset next: the finished run is skipped, the summary covers all three
    assert main(["batch", str(ds), "-model", "tiny", "-disagreement", "0", "-v", "0"]) == 0
    assert capsys.readouterr().err == ""
    assert [r["status"] for r in rows(deriv).values()] == ["done", "done", "skipped"]
    # -overwrite forces, as a bare flag or SCT-style 0|1
    for flag in (["-overwrite"], ["-overwrite", "1"]):
        assert main(["batch", str(ds), "-model", "tiny", "-task-label", "motor", "-v", "0", *flag]) == 0
        assert rows(deriv)["sub-02/func/sub-02_task-motor_run-1_bold.nii.gz"]["status"] == "done"
    assert main(["batch", str(ds), "-model", "tiny", "-task-label", "motor", "-overwrite", "0", "-v", "0"]) == 0
    assert rows(deriv)["sub-02/func/sub-02_task-motor_run-1_bold.nii.gz"]["status"] == "skipped"


def test_batch_cli_failed_run_gives_exit_1(tiny_model, tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds", runs=RUNS[:1], description=False)
    bad = ds / "sub-03/func/sub-03_task-rest_bold.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x1f\x8b\x08 broken")
    (ds / "sub-04").mkdir()
    out = tmp_path / "deriv"
    assert main(["batch", str(ds), "-o", str(out), "-model", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "WARNING: " in err and "no dataset_description.json" in err
    assert "sub-04: no func/ folder; skipped" in err
    assert "sub-03/func/sub-03_task-rest_bold.nii.gz failed" in err
    assert err.rstrip().endswith(f"error: 1 of 2 run(s) failed; see {out.resolve() / 'summary.tsv'}")
    assert [r["status"] for r in rows(out).values()] == ["done", "failed"]


def test_batch_cli_refusals_are_one_line(tiny_model, tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds", runs=RUNS[:1])
    (tmp_path / "file").write_text("")
    cases = [
        (["batch", str(tmp_path / "nope"), "-model", "tiny"], 1, "no such dataset folder"),
        (["batch", str(tmp_path), "-model", "tiny"], 1, "no sub-* folders"),
        (["batch", str(ds), "-model", "tiny", "-participant-label", "09"], 1, "no participant(s) 09"),
        (["batch", str(ds), "-model", "tiny", "-o", str(tmp_path / "file" / "d")], 1, "cannot create the derivatives folder"),
        (["batch", str(ds), "-model", "nosuchmodel"], 1, "unknown model 'nosuchmodel'"),
    ]
    for argv, code, text in cases:
        assert main(argv) == code
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1, err
    for argv in (["batch"], ["batch", str(ds), "-jobs", "0"], ["batch", str(ds), "-thr", "0"],
                 ["batch", str(ds), "-soft", "yes"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_batch_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["batch", "-h"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("-participant-label", "-task-label", "-jobs", "-scheduler", "-overwrite", "BIDS_DIR"):
        assert flag in text


def test_batch_cli_on_a_dask_scheduler(tiny_model, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    ds = make_dataset(tmp_path / "ds")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert main(["batch", str(ds), "-model", "tiny", "-scheduler", cluster.scheduler_address, "-soft", "1"]) == 0
    deriv = ds / "derivatives" / "sct_deepseg_epi"
    assert [r["status"] for r in rows(deriv).values()] == ["done"] * 3
    assert len(list(deriv.rglob("*_desc-spinalcord_probseg.nii.gz"))) == 3
    with pytest.importorskip("dask").config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main(["batch", str(ds), "-model", "tiny", "-scheduler", "tcp://127.0.0.1:1"]) == 1
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in capsys.readouterr().err


def test_batch_cli_missing_dask(tiny_model, tmp_path, capsys, monkeypatch):
    ds = make_dataset(tmp_path / "ds", runs=RUNS[:1])
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["batch", str(ds), "-model", "tiny", "-scheduler", "local"]) == 1
    assert "pip install 'sct_deepseg_epi[dask]'" in capsys.readouterr().err


def test_two_batches_at_once_share_the_work(tiny_model, tmp_path):
    """Two processes on the same dataset: every run segmented once, nothing half-written, both succeed."""
    runs = tuple(f"sub-{i:02d}/func/sub-{i:02d}_task-rest_bold.nii.gz" for i in range(1, 9))
    ds = make_dataset(tmp_path / "ds", runs=runs)
    cmd = [sys.executable, "-m", "sct_deepseg_epi", "batch", str(ds), "-model", "tiny", "-threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=CEILING_S) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    deriv = ds / "derivatives" / "sct_deepseg_epi"
    table = rows(deriv)
    assert sorted(table) == sorted(runs) and {r["status"] for r in table.values()} <= {"done", "skipped"}
    # each run was segmented by exactly one of the two batches
    done_lines = [line for _, err in outs for line in err.splitlines() if " done in " in line]
    assert len(done_lines) == len(runs), outs
    for rel in runs:
        stem = rel.rsplit("/", 1)[1].replace("_bold.nii.gz", "")
        side = json.loads((deriv / rel.rsplit("/", 1)[0] / f"{stem}_desc-spinalcord_mask.json").read_text())
        assert side["Batch"]["slices_with_cord"] == 6
        nib.load(str(deriv / rel.rsplit("/", 1)[0] / f"{stem}_desc-spinalcord_mask.nii.gz")).get_fdata()
    assert not [p for p in deriv.rglob("*") if ".part" in p.name or p.name.endswith(".work")]


def test_batch_cli_local_dask_cluster(tiny_model, tmp_path):
    pytest.importorskip("distributed")
    ds = make_dataset(tmp_path / "ds", runs=RUNS[:2])
    assert main(["batch", str(ds), "-model", "tiny", "-scheduler", "local", "-jobs", "1", "-threads", "1"]) == 0
    assert [r["status"] for r in rows(ds / "derivatives" / "sct_deepseg_epi").values()] == ["done", "done"]


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
def test_sct_run_batch_script_parallel_jobs(tiny_model, tmp_path):
    """docs/sct_run_batch_deepseg_epi.sh as sct_run_batch calls it: one process per subject, at once."""
    script = Path(__file__).resolve().parents[2] / "docs" / "sct_run_batch_deepseg_epi.sh"
    runs = RUNS + ("sub-03/ses-01/func/sub-03_ses-01_task-rest_bold.nii.gz",
                   "sub-03/ses-02/func/sub-03_ses-02_task-rest_bold.nii.gz")
    ds = make_dataset(tmp_path / "ds", runs=runs)
    (ds / "sub-04" / "anat").mkdir(parents=True)
    processed = tmp_path / "out" / "data_processed"
    processed.mkdir(parents=True)
    env = {**os.environ, "PATH_DATA": str(ds), "PATH_DATA_PROCESSED": str(processed), "OMP_NUM_THREADS": "1",
           "SCT_DEEPSEG_EPI": f"{sys.executable} -m sct_deepseg_epi", "SCT_DEEPSEG_EPI_MODEL": "tiny"}
    subjects = ["sub-01", "sub-02", "sub-03/ses-01", "sub-03/ses-02", "sub-04"]
    procs = [subprocess.Popen(["/bin/bash", str(script), s], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for s in subjects]
    outs = [p.communicate(timeout=CEILING_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 5, outs
    assert "sub-04: no func/*_bold.nii[.gz]; nothing to segment" in outs[4]
    assert "-session-label ses-01" in outs[2]
    table = rows(processed / "derivatives" / "sct_deepseg_epi")
    assert sorted(table) == sorted(runs) and {r["status"] for r in table.values()} == {"done"}


def test_batch_cli_progress_bar_on_a_terminal(tiny_model, tmp_path, capsys, monkeypatch):
    ds = make_dataset(tmp_path / "ds", runs=RUNS[:2])
    bad = ds / "sub-03/func/sub-03_task-rest_bold.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"junk")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["batch", str(ds), "-model", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "3/3" in err and ("run/s" in err or "s/run" in err)      # the tqdm bar
    assert "FAILED sub-03/func/sub-03_task-rest_bold.nii.gz: " in err
    assert "[1/3]" not in err                                        # no per-run log lines


# the longest any wait on a subprocess may take: only a hang reaches it, never a slow or loaded machine
CEILING_S = 600.0


def _abort_group(pid: int) -> None:
    import signal

    try:
        os.killpg(pid, signal.SIGABRT)
    except ProcessLookupError:
        pass


@pytest.mark.skipif(os.name != "posix", reason="needs process groups")
def test_ctrl_c_records_what_finished_and_a_rerun_resumes(tiny_model, tmp_path):
    import signal

    from filelock import FileLock

    ds = make_dataset(tmp_path / "ds", runs=RUNS[:2])
    held = ds / "sub-09/func/sub-09_task-rest_bold.nii.gz"
    held.parent.mkdir(parents=True)
    nib.save(blob_image(seed=9)[0], str(held))
    deriv = ds / "derivatives" / "sct_deepseg_epi"
    (deriv / "sub-09/func").mkdir(parents=True)
    (deriv / "sub-09/func/sub-09_task-rest_desc-spinalcord_mask.json").write_text("{}")
    # this run hangs: another process holds its lock, and the batch waits for it once the others are done
    lock = FileLock(str(deriv / "sub-09/func/.sub-09_task-rest_desc-spinalcord.lock"))
    lock.acquire()
    cmd = [sys.executable, "-m", "sct_deepseg_epi", "batch", str(ds), "-model", "tiny", "-jobs", "2"]
    # a hang dumps every thread of the batch (faulthandler on SIGABRT) instead of timing out mutely
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    watchdog = threading.Timer(CEILING_S, _abort_group, (p.pid,))  # only a hang reaches it, not a slow machine
    watchdog.start()
    try:
        seen: list[str] = []
        # the event: both free runs are recorded and the batch has gone on to wait for the held one
        while not any("held by another batch" in line for line in seen):
            line = p.stderr.readline()
            assert line, "the batch ended early:\n" + "".join(seen)
            seen.append(line)
        assert sum(" done in " in line for line in seen) == 2, seen
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground process group
        rest = p.communicate()[1]
    finally:
        watchdog.cancel()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        lock.release()
    assert p.returncode == 130 and "interrupted" in rest, (p.returncode, rest[-6000:])
    assert [r["status"] for r in rows(deriv).values()] == ["done", "done"]    # the held run is not recorded
    assert not list(deriv.glob("sub-09/func/*.nii.gz"))                       # nothing under a final name
    assert main(["batch", str(ds), "-model", "tiny", "-v", "0"]) == 0
    assert [r["status"] for r in rows(deriv).values()] == ["skipped", "skipped", "done"]
    assert [r["note"] for r in rows(deriv).values()][2] == "redone: mask missing"
    assert not [q for q in deriv.rglob("*") if ".part" in q.name or q.name.endswith(".work")]


def test_batch_takes_every_postprocessing_flag_and_keys_resume_on_it(tiny_model, tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds", runs=RUNS[:1])
    deriv = ds / "derivatives" / "sct_deepseg_epi"
    side = deriv / "sub-01/func/sub-01_task-rest_desc-spinalcord_mask.json"
    assert main(["batch", str(ds), "-model", "tiny", "-threads", "1"]) == 0
    plain = json.loads(side.read_text())
    argv = ["batch", str(ds), "-model", "tiny", "-threads", "1", "-postprocess", "3d", "-largest", "0",
            "-remove-small", "4mm3", "-dilate", "1", "-roi", "0"]
    assert main(argv) == 0
    grown = json.loads(side.read_text())
    assert grown["postprocess"] == {"method": "3d", "largest": False, "fill_holes": True, "remove_small": "4mm3",
                                    "dilate": 1}
    assert grown["localise"] is False and grown["Batch"]["cord_volume_mm3"] > plain["Batch"]["cord_volume_mm3"]
    capsys.readouterr()
    assert main(argv) == 0 and "skipped" in capsys.readouterr().err  # same settings: up to date

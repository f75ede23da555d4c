"""The batch engine on small real datasets and the tiny ONNX model."""
from __future__ import annotations

import csv
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image

from sct_deepseg_epi import batch, bids
from sct_deepseg_epi.errors import InputError
from sct_deepseg_epi.write import sidecar_path

# the tiny model marks every voxel of the disc: radius 4 -> 49 voxels per slice, 6 slices of 1x1x4 mm
DISC_MM3 = 49 * 6 * 4.0


def make_dataset(root: Path, runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",
                                   "sub-02/ses-1/func/sub-02_ses-1_task-rest_bold.nii.gz"),
                 n_volumes: int | None = 3, description: bool = True) -> Path:
    """A BIDS dataset of blob images (one per run, seeded by position) that the tiny model segments."""
    for i, rel in enumerate(runs):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        nib.save(blob_image(n_volumes=n_volumes, seed=i)[0], str(p))
    if description:
        (root / "dataset_description.json").write_text(json.dumps({"Name": "Demo", "BIDSVersion": "1.9.0"}))
    return root


def summary_rows(deriv: Path) -> dict[str, dict[str, str]]:
    with open(deriv / "summary.tsv", newline="") as f:
        return {r["run"]: r for r in csv.DictReader(f, delimiter="\t")}


def test_batch_writes_bids_derivatives(tiny_model, tmp_path):
    ds = make_dataset(tmp_path / "ds")
    bad = ds / "sub-03/func/sub-03_task-rest_bold.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x1f\x8b truncated")
    seen = []
    res = batch.run_batch(ds, model="tiny", soft=True, progress=lambda r, n, t: seen.append((r.run, n, t)))
    deriv = ds / "derivatives" / "sct_deepseg_epi"
    assert res.derivatives == deriv.resolve()
    assert [(n, t) for _, n, t in seen] == [(1, 3), (2, 3), (3, 3)]
    assert [r.status for r in res.records] == ["done", "done", "failed"]
    assert [r.run for r in res.failed] == ["sub-03/func/sub-03_task-rest_bold.nii.gz"]
    # the error names the run relative to the dataset, on one line
    assert res.failed[0].error.startswith("sub-03/func/sub-03_task-rest_bold.nii.gz: not a readable NIfTI")

    out = bids.outputs_for(res_run := bids.find_runs(ds).runs[1], deriv)
    mask = nib.load(str(out.mask))
    src = nib.load(str(res_run.path))
    assert mask.shape == src.shape[:3] and np.allclose(mask.affine, src.affine)
    assert mask.get_data_dtype() == np.uint8
    side = json.loads(out.sidecar.read_text())
    assert side["Sources"] == ["bids:raw:sub-02/ses-1/func/sub-02_ses-1_task-rest_bold.nii.gz"]
    assert side["model"]["name"] == "tiny" and side["threshold"] == 0.5
    assert side["outputs"] == {"mask": out.mask.name, "soft": out.soft.name}
    assert side["Batch"]["cord_volume_mm3"] == DISC_MM3 and side["Batch"]["slices_with_cord"] == 6
    assert out.soft.is_file() and json.loads(sidecar_path(out.soft).read_text())["Sources"] == side["Sources"]
    assert not out.disagreement.exists()
    # nothing half-written is left behind
    assert not [p for p in deriv.rglob("*") if ".part" in p.name or p.name.endswith(".work")]

    desc = json.loads((deriv / "dataset_description.json").read_text())
    model = desc["GeneratedBy"][0]["Model"]
    assert (model["Name"], model["Version"]) == ("tiny", "1.0.0")
    assert [m["SHA256"] for m in model["Members"]] == [m["sha256"] for m in side["model"]["members"]]
    assert desc["DatasetLinks"]["raw"] == "../.."

    rows = summary_rows(deriv)
    assert list(next(iter(rows.values()))) == list(batch.COLUMNS)
    row = rows["sub-01/func/sub-01_task-rest_bold.nii.gz"]
    assert (row["status"], float(row["cord_volume_mm3"]), row["slices_with_cord"], row["n_slices"]) == (
        "done", DISC_MM3, "6", "6")
    assert row["flagged_slices"] == "0" and side["Batch"]["flagged_slices"] == 0
    assert rows["sub-03/func/sub-03_task-rest_bold.nii.gz"]["status"] == "failed"
    assert rows["sub-03/func/sub-03_task-rest_bold.nii.gz"]["cord_volume_mm3"] == "n/a"


def test_resume_skips_up_to_date_runs_and_redoes_changed_ones(tiny_model, tmp_path):
    ds = make_dataset(tmp_path / "ds")
    deriv = tmp_path / "out"
    first = batch.run_batch(ds, deriv, model="tiny")
    assert [r.status for r in first.records] == ["done", "done"]
    out0 = bids.outputs_for(bids.find_runs(ds).runs[0], deriv)
    stamp = out0.mask.stat().st_mtime_ns

    again = batch.run_batch(ds, deriv, model="tiny")
    assert [r.status for r in again.records] == ["skipped", "skipped"]
    assert again.records[0].cord_volume_mm3 == DISC_MM3        # figures come from the sidecar
    assert out0.mask.stat().st_mtime_ns == stamp

    # a changed input is redone, the other run is not
    nib.save(blob_image(n_volumes=2, seed=7)[0], str(bids.find_runs(ds).runs[1].path))
    res = batch.run_batch(ds, deriv, model="tiny")
    assert [(r.status, r.note) for r in res.records] == [("skipped", "outputs up to date"),
                                                        ("done", "redone: input changed")]
    # other settings redo everything; asking for a map adds it, dropping it removes the stale one
    res = batch.run_batch(ds, deriv, model="tiny", options={"threshold": 0.4}, disagreement=True)
    assert [r.note for r in res.records] == ["redone: settings changed"] * 2
    assert out0.disagreement.is_file()
    res = batch.run_batch(ds, deriv, model="tiny", options={"threshold": 0.4})
    assert [r.status for r in res.records] == ["done", "done"] and not out0.disagreement.exists()
    assert not sidecar_path(out0.disagreement).exists()
    # -overwrite forces
    res = batch.run_batch(ds, deriv, model="tiny", options={"threshold": 0.4}, overwrite=True)
    assert [r.status for r in res.records] == ["done", "done"]
    # a half-finished earlier run (mask without sidecar) is redone
    out0.sidecar.unlink()
    assert [r.status for r in batch.run_batch(ds, deriv, model="tiny", options={"threshold": 0.4}).records] == [
        "done", "skipped"]


def test_leftovers_of_a_killed_writer_are_cleared(tiny_model, tmp_path):
    ds = make_dataset(tmp_path / "ds", runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",))
    folder = bids.default_derivatives(ds) / "sub-01" / "func"
    (folder / ".sub-01_task-rest.abc123.work").mkdir(parents=True)       # the work folder of a killed worker
    (folder / ".sub-01_task-rest.abc123.work" / "mask.nii.gz").write_bytes(b"half")
    (folder / ".sub-01_task-rest_desc-spinalcord_mask.json.x1.part.json").write_text("{")
    (folder / ".sub-01_task-rest_run-2.zz.work").mkdir()                  # another run's: not ours to clear
    assert [r.status for r in batch.run_batch(ds, model="tiny").records] == ["done"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")) == [
        ".sub-01_task-rest_run-2.zz.work"]


def test_other_model_version_is_redone_and_reported(model_root, tmp_path):
    from conftest import make_model_folder

    make_model_folder(model_root / "tiny" / "1.0.0")
    ds = make_dataset(tmp_path / "ds", runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",))
    batch.run_batch(ds, model="tiny")
    make_model_folder(model_root / "tiny" / "1.1.0", version="1.1.0")
    res = batch.run_batch(ds, model="tiny")
    assert res.records[0].note == "redone: model changed"
    assert any("earlier outputs came from model tiny 1.0.0" in n for n in res.notes)
    desc = json.loads((res.derivatives / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Model"]["Version"] == "1.1.0"


def test_unfetched_annex_file_is_explained(tiny_model, tmp_path):
    ds = make_dataset(tmp_path / "ds", runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",))
    link = ds / "sub-02/func/sub-02_task-rest_bold.nii.gz"
    link.parent.mkdir(parents=True)
    link.symlink_to("../../.git/annex/objects/XX/yy/SHA256E-s1--0.nii.gz")  # DataLad before `datalad get`
    res = batch.run_batch(ds, model="tiny")
    assert [r.status for r in res.records] == ["done", "failed"]
    assert "broken symbolic link" in res.records[1].error and "datalad get" in res.records[1].error


def test_dataset_without_description_subject_without_func(tiny_model, tmp_path):
    ds = make_dataset(tmp_path / "ds", runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",), description=False)
    (ds / "sub-02" / "anat").mkdir(parents=True)
    res = batch.run_batch(ds, model="tiny")
    assert [r.status for r in res.records] == ["done"]
    assert any("no dataset_description.json" in n for n in res.notes)
    assert "sub-02: no func/ folder; skipped" in res.notes
    desc = json.loads((res.derivatives / "dataset_description.json").read_text())
    assert desc["Name"] == "Spinal cord masks"


def test_3d_runs_and_4d_each(tiny_model, tmp_path):
    ds = make_dataset(tmp_path / "ds", runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",), n_volumes=4)
    res = batch.run_batch(ds, model="tiny", options={"mode_4d": "each"})
    mask = nib.load(str(bids.outputs_for(bids.find_runs(ds).runs[0], res.derivatives).mask))
    assert mask.shape == (40, 36, 6, 4)
    assert res.records[0].cord_volume_mm3 == DISC_MM3   # the mean over volumes
    ds3 = make_dataset(tmp_path / "ds3", runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",), n_volumes=None)
    assert batch.run_batch(ds3, model="tiny").records[0].slices_with_cord == 6


def test_derivatives_folder_that_cannot_be_written(tiny_model, tmp_path, monkeypatch):
    ds = make_dataset(tmp_path / "ds", runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    # a location under a regular file: no one, root included, can create it
    with pytest.raises(InputError, match="cannot create the derivatives folder.*pass -o"):
        batch.run_batch(ds, a_file / "deriv", model="tiny")
    # a read-only mount refuses the probe file even to root; simulate the refusal
    real = tempfile.mkstemp

    def refuse(*a, dir=None, **kw):
        if str(dir).startswith(str(tmp_path / "ro")):
            raise PermissionError(30, "Read-only file system")
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(InputError, match="ro: the derivatives folder is not writable \\(Read-only file system\\)"):
        batch.run_batch(ds, tmp_path / "ro", model="tiny")
    assert not (tmp_path / "ro" / "summary.tsv").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_folder_by_permissions(tiny_model, tmp_path):
    ds = make_dataset(tmp_path / "ds", runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(InputError, match="not writable"):
            batch.run_batch(ds, ro, model="tiny")
    finally:
        ro.chmod(0o755)


def test_refuses_derivatives_inside_a_subject(tiny_model, tmp_path):
    ds = make_dataset(tmp_path / "ds", runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",))
    with pytest.raises(InputError, match="must not be the dataset itself"):
        batch.run_batch(ds, ds / "sub-01" / "out", model="tiny")
    assert not (ds / "sub-01" / "out").exists()
    with pytest.raises(InputError, match="-thr 0"):
        batch.run_batch(ds, model="tiny", options={"threshold": 0})


def test_plan_threads():
    assert batch.plan_threads(1, cores=8) == (8, None)
    assert batch.plan_threads(3, cores=8) == (2, None)
    assert batch.plan_threads(16, cores=8) == (1, None)
    threads, warn = batch.plan_threads(4, 4, cores=8)
    assert threads == 4 and "oversubscribed" in warn


def test_worker_pool_two_processes(tiny_model, tmp_path):
    ds = make_dataset(tmp_path / "ds", runs=tuple(f"sub-0{i}/func/sub-0{i}_task-rest_bold.nii.gz" for i in range(1, 4)))
    bad = ds / "sub-04/func/sub-04_task-rest_bold.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image")
    res = batch.run_batch(ds, model="tiny", jobs=2)
    assert [r.status for r in res.records] == ["done", "done", "done", "failed"]
    assert len(summary_rows(res.derivatives)) == 4


def test_a_run_held_by_another_batch_is_waited_for(tiny_model, tmp_path):
    from filelock import FileLock

    ds = make_dataset(tmp_path / "ds")
    runs = bids.find_runs(ds).runs
    deriv = tmp_path / "out"
    out0 = bids.outputs_for(runs[0], deriv)
    out0.folder.mkdir(parents=True)
    held = FileLock(str(out0.lock), thread_local=False)  # released from a timer thread below
    held.acquire()
    # held throughout: the other run is done, this one fails after the wait, and says why
    res = batch.run_batch(ds, deriv, model="tiny", lock_wait=0.2)
    assert [r.status for r in res.records] == ["failed", "done"]
    assert "still locked by another process" in res.records[0].error
    assert not out0.mask.exists()
    # released while we wait: the run is then segmented
    timer = threading.Timer(0.5, held.release)
    timer.start()
    t0 = time.monotonic()
    res = batch.run_batch(ds, deriv, model="tiny")
    timer.join()
    assert time.monotonic() - t0 >= 0.4
    assert [r.status for r in res.records] == ["done", "skipped"]
    assert out0.mask.is_file()


def test_dask_local_cluster(tiny_model, tmp_path):
    distributed = pytest.importorskip("distributed")
    ds = make_dataset(tmp_path / "ds")
    bad = ds / "sub-03/func/sub-03_task-rest_bold.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        (addr,) = client.scheduler_info()["workers"]
        assert batch.thread_plan(client) == {addr: max(1, batch.cpu_count() // 2)}  # 2 task slots share the CPUs
        res = batch.run_batch(ds, model="tiny", client=client)
        assert [r.status for r in res.records] == ["done", "done", "failed"]
        assert "the file is empty" in res.records[2].error
        # the client given is the caller's: still usable afterwards
        assert client.submit(lambda: 1).result() == 1
    again = batch.run_batch(ds, model="tiny")
    assert [r.status for r in again.records] == ["skipped", "skipped", "failed"]


def test_missing_dask_is_explained(tiny_model, tmp_path, monkeypatch):
    import sys

    ds = make_dataset(tmp_path / "ds", runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",))
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"pip install 'sct_deepseg_epi\[dask\]'"):
        batch.run_batch(ds, model="tiny", scheduler="tcp://127.0.0.1:8786")
    assert not (ds / "derivatives").exists()  # refused before anything was written


def test_a_worker_that_dies_is_replaced_and_its_run_recorded(tiny_model, tmp_path):
    """Kill the worker stuck on one run, twice: that run fails, the others are done, the batch ends."""
    import multiprocessing
    import signal

    from filelock import FileLock

    ds = make_dataset(tmp_path / "ds", runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",
                                             "sub-02/func/sub-02_task-rest_bold.nii.gz"))
    out = bids.outputs_for(bids.find_runs(ds).runs[0], bids.default_derivatives(ds))
    out.folder.mkdir(parents=True)
    # another process holds the run's lock: once the free run is done, a worker waits for it (a stand-in
    # for a worker that hangs or is killed)
    lock = FileLock(str(out.lock))
    lock.acquire()
    seen: list = []
    result: list = []
    t = threading.Thread(target=lambda: result.append(batch.run_batch(
        ds, model="tiny", jobs=2, progress=lambda r, n, total: seen.append(r.run))), daemon=True)
    t.start()
    try:
        killed: set[int] = set()
        for _ in range(2):
            deadline = time.monotonic() + 600  # a ceiling for a hang, not a speed
            while time.monotonic() < deadline:
                kids = [k for k in multiprocessing.active_children() if k.pid not in killed]
                if kids and seen:  # a (new) worker waits for the held run, and the free run has finished
                    break
                time.sleep(0.05)
            time.sleep(0.3)
            for k in kids:
                killed.add(k.pid)
                os.kill(k.pid, signal.SIGKILL)
        t.join(600)
        assert not t.is_alive()
    finally:
        lock.release()
    res = result[0]
    assert [r.status for r in res.records] == ["failed", "done"]
    assert "worker process died twice" in res.records[0].error


def test_mask_stats_finds_the_axial_axis(tmp_path):
    # stored S-I along the first array axis: 3 slices, cord in slices 0 and 2 only; 2 x 1 x 1 mm voxels
    data = np.zeros((3, 4, 5), np.uint8)
    data[0, 1, 1] = data[2, 1:3, 1] = 1
    affine = np.array([[0, 2.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    p = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(p))
    assert batch.mask_stats(p) == (3 * 2.0, 2, 3, 1)
    # 4D: the volume is the mean over frames, a slice counts if any frame has cord there
    four = np.stack([data, np.zeros_like(data)], axis=-1)
    nib.save(nib.Nifti1Image(four, affine), str(p))
    assert batch.mask_stats(p) == (3.0, 2, 3, 2)


def test_importing_the_batch_module_stays_light():
    """Workers set their thread counts after importing this module: numpy and ONNX Runtime must not load with it."""
    import subprocess
    import sys

    code = ("import sys, sct_deepseg_epi.batch, sct_deepseg_epi.cli.batch; "
            "print(sorted(m for m in ('numpy', 'onnxruntime', 'nibabel', 'distributed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_summary_counts_flagged_slices_and_keeps_them_when_resuming(tiny_model, tmp_path):
    ds = make_dataset(tmp_path / "ds", runs=("sub-01/func/sub-01_task-rest_bold.nii.gz",), n_volumes=None)
    p = ds / "sub-01/func/sub-01_task-rest_bold.nii.gz"
    img = nib.load(str(p))
    data = np.asarray(img.dataobj).copy()
    data[:, :, 3] = 100.0                            # no cord visible on one slice between others
    nib.save(nib.Nifti1Image(data, img.affine), str(p))
    deriv = tmp_path / "out"
    first = batch.run_batch(ds, deriv, model="tiny")
    assert first.records[0].flagged_slices == 1
    assert summary_rows(deriv)["sub-01/func/sub-01_task-rest_bold.nii.gz"]["flagged_slices"] == "1"
    again = batch.run_batch(ds, deriv, model="tiny")
    assert again.records[0].status == "skipped" and again.records[0].flagged_slices == 1

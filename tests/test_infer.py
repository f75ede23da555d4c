"""Stage 3: ONNX Runtime ensemble, flip TTA, disagreement."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model_folder

from sct_deepseg_epi.errors import ModelError
from sct_deepseg_epi.infer import Ensemble, flip_sets, get_session, providers_for
from sct_deepseg_epi.registry.manifest import load_manifest


def test_flip_sets():
    assert flip_sets([0]) == [(), (0,)]
    assert flip_sets([0, 1]) == [(), (0,), (1,), (0, 1)]


def test_ensemble_probability_and_disagreement(tmp_path):
    spec = load_manifest(make_model_folder(tmp_path / "m", members=((1.0, 0.0), (1.0, 2.0))))
    ens = Ensemble(spec, device="cpu", threads=1)
    x = np.zeros((2, 1, 8, 8), np.float32)
    out = ens.predict(x)
    # members give sigmoid(0)=0.5 and sigmoid(2)=0.881: mean 0.690, std 0.190
    s2 = 1 / (1 + np.exp(-2.0))
    assert np.allclose(out.probability, (0.5 + s2) / 2, atol=1e-5)
    assert np.allclose(out.disagreement, (s2 - 0.5) / 2, atol=1e-5)
    assert out.labels is None and ens.provider == "CPUExecutionProvider"


def test_tta_flip_is_undone(tmp_path):
    spec = load_manifest(make_model_folder(tmp_path / "m", members=((1.0, 0.0),)))
    x = np.zeros((1, 1, 8, 8), np.float32)
    x[0, 0, 1, 2] = 5.0  # an asymmetric input: a wrong un-flip would move the response
    p = Ensemble(spec, device="cpu", threads=1).predict(x).probability
    assert np.unravel_index(np.argmax(p), p.shape) == (0, 1, 2)


def test_sessions_are_cached(tmp_path):
    spec = load_manifest(make_model_folder(tmp_path / "m"))
    path = spec.member_paths()[0]
    assert get_session(path, ["CPUExecutionProvider"], 1) is get_session(path, ["CPUExecutionProvider"], 1)


def test_shared_arena_sessions_come_and_go_with_the_same_results(tmp_path):
    from sct_deepseg_epi.infer import new_session

    spec = load_manifest(make_model_folder(tmp_path / "m", members=((2.0, -1.0), (0.5, 0.3))))
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    for path in spec.member_paths():
        plain = new_session(path, ["CPUExecutionProvider"], 1).run(None, {"image": x})[0]
        for _ in range(2):  # the process-wide arena is registered once and outlives each session
            sess = new_session(path, ["CPUExecutionProvider"], 1, shared_arena=True)
            assert sess.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
            assert np.array_equal(sess.run(None, {"image": x})[0], plain)
            del sess


def test_cuda_unavailable_is_a_clear_error():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ModelError, match="CUDA"):
        providers_for("cuda")
    assert providers_for("auto") == ["CPUExecutionProvider"]


def test_wrong_channel_count(tmp_path):
    spec = load_manifest(make_model_folder(tmp_path / "m"))
    with pytest.raises(ModelError, match="expects"):
        Ensemble(spec, device="cpu").predict(np.zeros((1, 3, 8, 8), np.float32))


def test_broken_onnx_file(tmp_path):
    folder = make_model_folder(tmp_path / "m")
    (folder / "member0.onnx").write_bytes(b"garbage")
    spec = load_manifest(folder)
    with pytest.raises(ModelError, match="cannot load"):
        Ensemble(spec, device="cpu")


class _Counting:
    """A session that counts its calls and the pixels it was given."""

    def __init__(self, sess):
        self.sess, self.calls, self.pixels = sess, 0, 0

    def run(self, names, feeds):
        self.calls += 1
        self.pixels += feeds["image"].shape[0] * feeds["image"].shape[2] * feeds["image"].shape[3]
        return self.sess.run(names, feeds)

    def get_providers(self):
        return self.sess.get_providers()


@pytest.mark.parametrize("tta", [True, False])
def test_quick_pass_reused_as_the_first_members_identity_call(tmp_path, tta):
    spec = load_manifest(make_model_folder(tmp_path / "m", members=((2.0, -1.0), (0.5, 0.3), (1.0, 0.0))))
    ens = Ensemble(spec, device="cpu", threads=2, tta=tta)
    x = np.random.default_rng(0).standard_normal((5, 1, 16, 24)).astype(np.float32)
    x[:, :, :, :3] += 4  # asymmetric, so that flips matter
    plain = ens.predict(x)
    quick = ens.predict(x, quick=True).probability
    ens.sessions = [_Counting(s) for s in ens.sessions]
    reused = ens.predict(x, first=quick)
    assert np.array_equal(reused.probability, plain.probability)
    assert np.array_equal(reused.disagreement, plain.disagreement)
    # the first member ran only its flipped views (nothing at all without flips)
    assert ens.sessions[0].pixels == (x.shape[0] * 16 * 24 if tta else 0)
    assert ens.sessions[1].pixels == x.shape[0] * 16 * 24 * len(ens.flips)


def test_results_do_not_depend_on_call_size_or_threads(tmp_path):
    spec = load_manifest(make_model_folder(tmp_path / "m", members=((2.0, -1.0), (0.5, 0.3))))
    x = np.random.default_rng(1).standard_normal((7, 1, 24, 16)).astype(np.float32)
    ref = Ensemble(spec, device="cpu", threads=1).predict(x)
    for threads, pixels in ((1, 1), (2, 24 * 16 * 2 * 3), (3, 1 << 19)):
        ens = Ensemble(spec, device="cpu", threads=threads)
        ens.call_pixels = pixels
        ens.sessions = [_Counting(s) for s in ens.sessions]
        out = ens.predict(x)
        assert np.array_equal(out.probability, ref.probability) and np.array_equal(out.disagreement, ref.disagreement)
        per_call = max(1, pixels // (24 * 16 * 2))
        assert ens.sessions[0].calls == -(-7 // per_call)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_runs_the_ensemble_on_threads_of_its_own(tmp_path):
    import multiprocessing

    global _INHERITED
    spec = load_manifest(make_model_folder(tmp_path / "m", members=((2.0, -1.0), (0.5, 0.3))))
    ens = Ensemble(spec, device="cpu", threads=2)
    ens.call_pixels = 1  # a call per slice: several calls, so the thread pool is used
    x = np.random.default_rng(2).standard_normal((4, 1, 8, 8)).astype(np.float32)
    want = ens.predict(x).probability  # the parent's pool exists before the fork
    _INHERITED = (ens, x)
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(_predict_inherited).get(timeout=60)
    finally:
        _INHERITED = None
    assert np.array_equal(got, want)


_INHERITED = None


def _predict_inherited():
    ens, x = _INHERITED
    return ens.predict(x).probability


@pytest.mark.parametrize("centre, size_mm", [((20, 18), 24.0), ((21, 17), 24.0), ((3, 33), 16.0), ((20, 18), 500.0)])
def test_predict_window_normalises_on_the_window_alone(tmp_path, centre, size_mm):
    from conftest import blob_image

    from sct_deepseg_epi.infer import SliceBackend
    from sct_deepseg_epi.read import from_image

    spec = load_manifest(make_model_folder(tmp_path / "m"))
    vol = from_image(blob_image()[0])  # 1 mm in-plane: the model's grid, no resampling
    data = vol.data.copy()
    data[:, :, 3] *= 0.1  # a slice at a tenth of the signal
    backend = SliceBackend(spec, threads=1)
    whole = backend.predict(data, vol, timings={}).probability
    win = backend.predict_window(data, vol, 3, centre, size_mm)
    inside = np.isfinite(win)
    # the window: centred on the point where the image allows, the whole field at most
    xs, ys = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    size = [min(n, int(size_mm)) for n in data.shape[:2]]
    assert [len(xs), len(ys)] == size
    for lo, c, n, s in zip((xs[0], ys[0]), centre, data.shape[:2], size):
        assert lo == min(max(0, c - s // 2), n - s)
    # by hand: each member's sigmoid(8 z + b), z the window's own z-score (1x1 conv: flips change nothing)
    part = data[xs[0]:xs[-1] + 1, ys[0]:ys[-1] + 1, 3]
    z = (part - part.mean()) / part.std()
    want = np.mean([1 / (1 + np.exp(-(8 * z + b))) for b in (-16.0, -15.0, -17.0)], axis=0)
    np.testing.assert_allclose(win[xs[0]:xs[-1] + 1, ys[0]:ys[-1] + 1], want, atol=1e-5)
    if centre == (20, 18) and size_mm < 100:
        assert whole[20, 18, 3] < 0.5 <= win[20, 18]  # the dimmed cord: missed on the whole image, found here

"""Volumes on disk deconvolved block by block: equal to the in-memory result, resumable after an
interruption, the same on a 2-worker Dask cluster, and map_overlap on a dask array."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

import rln_fast as rf
from rln_fast import distributed, io
from rln_fast.models.rln import RLN

pytest.importorskip("zarr")  # the GPU machine has no zarr: these tests run in CI

VOXEL = (0.3, 0.13, 0.13)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = (rng.gamma(2.0, 40.0, (37, 70, 61)) + 5).astype(np.uint16)
    path = tmp_path_factory.mktemp("in") / "stack.tif"
    tifffile.imwrite(path, x, imagej=True, resolution=(1 / VOXEL[2], 1 / VOXEL[1]),
                     metadata={"spacing": VOXEL[0], "unit": "um", "axes": "ZYX"})
    return path, x


@pytest.mark.parametrize("name,ngff", [("out.ome.zarr", "0.5"), ("out.zarr", "0.4"),
                                       ("out.tif", "0.5")])
def test_file_rln_equals_in_memory(tmp_path, stack, model_path, name, ngff):
    path, x = stack
    expected = rf.rln_deconvolve(x, RLN.load(model_path), progress=False)
    summary = distributed.deconvolve_file(path, tmp_path / name, model=model_path,
                                          tile=(16, 32, 32), ngff=ngff, progress=False)
    assert summary["blocks"] == 3 * 3 * 2
    y, meta = io.read(tmp_path / name)
    assert y.dtype == np.float32 and meta["voxel_size"] == pytest.approx(VOXEL)
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()
    assert not (tmp_path / (name + ".partial")).exists()
    assert not (tmp_path / (name + ".blocks")).exists()


def test_file_rln_uses_the_model_percentiles(tmp_path, stack, model_path):
    path, x = stack
    m = RLN.load(model_path)
    m.metadata["norm_percentiles"] = [0.01, 99.99]  # as rln_fast.train records them
    m.save(tmp_path / "m.pt")
    expected = rf.rln_deconvolve(x, m, progress=False)
    distributed.deconvolve_file(path, tmp_path / "out.tif", model=tmp_path / "m.pt",
                                tile=(16, 32, 32), progress=False)
    y, _ = io.read(tmp_path / "out.tif")
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()
    official = rf.rln_deconvolve(x, RLN.load(model_path), progress=False)
    assert np.abs(y - official).max() > 1e-3 * np.abs(expected).max()


def test_interrupted_run_resumes_to_the_same_output(tmp_path, stack, model_path, monkeypatch):
    path, _ = stack
    ref = tmp_path / "ref.zarr"
    distributed.deconvolve_file(path, ref, model=model_path, tile=(16, 32, 32), progress=False)
    out = tmp_path / "out.zarr"
    run = distributed.BlockJob.run
    calls = {"n": 0}

    def dies_on_the_eighth(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return run(self, *a, **k)

    monkeypatch.setattr(distributed.BlockJob, "run", dies_on_the_eighth)
    with pytest.raises(KeyboardInterrupt):
        distributed.deconvolve_file(path, out, model=model_path, tile=(16, 32, 32), progress=False)
    assert not out.exists()
    assert len(list((tmp_path / "out.zarr.blocks").glob("*_*_*"))) == 7
    monkeypatch.setattr(distributed.BlockJob, "run", run)
    summary = distributed.deconvolve_file(path, out, model=model_path, tile=(16, 32, 32),
                                          progress=False)
    assert summary["resumed_blocks"] == 7
    np.testing.assert_array_equal(io.read(out)[0], io.read(ref)[0])


def test_changed_settings_start_over(tmp_path, stack, model_path, monkeypatch):
    path, _ = stack
    out = tmp_path / "out.zarr"
    run = distributed.BlockJob.run

    def dies(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed.BlockJob, "run", dies)
    with pytest.raises(KeyboardInterrupt):
        distributed.deconvolve_file(path, out, model=model_path, tile=(16, 32, 32), progress=False)
    monkeypatch.setattr(distributed.BlockJob, "run", run)
    # Another model: the finished blocks of the first run must not be reused.
    summary = distributed.deconvolve_file(path, out, model="default", tile=(16, 32, 32),
                                          progress=False)
    assert summary["resumed_blocks"] == 0


def test_file_rl_matches_tiled_rl(tmp_path, stack):
    path, x = stack
    k = rf.psf.gaussian((7, 11, 11), 1.0, sigma=(1.2, 1.5, 1.5))
    psf_path = tmp_path / "psf.tif"
    io.write(psf_path, k, voxel_size=VOXEL)
    expected = rf.richardson_lucy(x, k, 5, tile=(16, 32, 32), progress=False)
    distributed.deconvolve_file(path, tmp_path / "rl.tif", method="rl", psf=psf_path, num_iter=5,
                                tile=(16, 32, 32), progress=False)
    np.testing.assert_allclose(io.read(tmp_path / "rl.tif")[0], expected, rtol=1e-5,
                               atol=1e-5 * expected.max())


def test_two_worker_cluster_equals_one_process(tmp_path, stack, model_path):
    pytest.importorskip("distributed")
    path, _ = stack
    one = tmp_path / "one.zarr"
    two = tmp_path / "two.zarr"
    distributed.deconvolve_file(path, one, model=model_path, tile=(16, 32, 32), progress=False)
    summary = distributed.deconvolve_file(path, two, model=model_path, tile=(16, 32, 32),
                                          scheduler="local", n_workers=2, device="cpu",
                                          progress=False)
    assert summary["blocks"] == 18
    np.testing.assert_array_equal(io.read(two)[0], io.read(one)[0])


def test_map_overlap_on_a_dask_array(stack, model_path):
    da = pytest.importorskip("dask.array")
    _, x = stack
    m = RLN.load(model_path)
    expected = rf.rln_deconvolve(x, m, progress=False)
    # Odd chunk sizes on purpose: map_overlap makes the cuts even.
    lazy = distributed.map_overlap(da.from_array(x, chunks=(15, 33, 29)), model=m)
    assert lazy.shape == x.shape and lazy.dtype == np.float32
    y = lazy.compute(scheduler="synchronous")
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()


def test_even_chunks():
    assert distributed._even_chunks((15, 15, 7)) == (16, 16, 5)
    assert distributed._even_chunks((37,)) == (37,)
    assert distributed._at_least((16, 16, 5), 16) == (16, 21)
    assert all(c % 2 == 0 for c in distributed._at_least((3, 3, 3, 3, 3, 3), 4)[:-1])

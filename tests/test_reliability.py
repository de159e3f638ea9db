"""Never lose a user's data (issue 15): each numbered case of the issue, reproduced on tiny
volumes, plus the cases that held (resume bit-exact after kill -9, disk full keeps the old
output, a malicious .pt never runs code). Real subprocesses where processes matter."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from rln_fast import distributed, io, tiling
from rln_fast.cli import main
from rln_fast.deconvolve import rln_deconvolve
from rln_fast.rl import richardson_lucy

zarr = pytest.importorskip("zarr")

# The children run on one thread (OMP_NUM_THREADS=1); the runs compared with theirs bit for
# bit use one too (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (16, 48, 48)
RL = {"method": "rl", "num_iter": 2, "tile": (8, 24, 24), "progress": False}
ROOT = Path(__file__).resolve().parents[1]
VOXEL = (0.3, 0.13, 0.13)


def _psf() -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2 for n in (3, 5, 5)), indexing="ij")
    k = np.exp(-(z**2 + y**2 + x**2) / 2.0)
    return (k / k.sum()).astype(np.float32)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    vol = (rng.random(SHAPE) * 100 + 10).astype(np.float32)
    inp = tmp_path / "in.tif"
    # Voxel sizes in both files: the command's voxel-size warnings stay out of the one-line
    # error messages these tests read.
    io.write(inp, vol, voxel_size=VOXEL)
    psf = tmp_path / "psf.tif"
    io.write(psf, _psf(), voxel_size=VOXEL)
    return inp, psf, vol


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line(text: str) -> str:
    """The one line a failure prints, past the command's voxel-size warnings (files written
    without a voxel size, as some of these tests do on purpose)."""
    lines = [ln for ln in text.strip().splitlines()
             if ln.strip() and not (": warning:" in ln and "voxel size" in ln)]
    assert len(lines) == 1, text
    return lines[0]


def _child(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended ({proc.returncode}): {proc.stderr.read()}")
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


# ------------------------------------------------------- 1. what is at the output path


@pytest.mark.parametrize("name,make", [
    ("d.tif", lambda p: (p.mkdir(), (p / "keep").write_text("mine"))),
    ("o.ome.zarr", lambda p: (io.write(p, np.ones((2, 4, 4), np.uint16)),
                              (p / "labels").mkdir(), (p / "notes.txt").write_text("mine"))),
    ("results.zarr", lambda p: zarr.open_array(str(p), mode="w", shape=(2, 4, 4), dtype="u2")),
    ("n.tif", lambda p: p.write_text("not a TIFF")),
])
def test_foreign_output_is_refused_unless_overwrite(data, tmp_path, name, make):
    inp, psf, _ = data
    out = tmp_path / name
    make(out)
    before = sorted(str(p.relative_to(tmp_path)) for p in out.rglob("*")) if out.is_dir() else []
    r = _cli("deconvolve", inp, out, "--method", "rl", "--psf", psf, "--num-iter", 1,
             "--no-progress")
    assert r.exit_code == 1
    assert "rln_fast replaces only its own outputs" in _one_line(r.output)
    if out.is_dir():
        assert sorted(str(p.relative_to(tmp_path)) for p in out.rglob("*")) == before
    assert not [n for n in _listing(tmp_path) if n.startswith(name + ".")]
    with pytest.raises(io.ImageIOError, match="replaces only its own outputs"):
        distributed.deconvolve_file(inp, out, psf=psf, **RL)
    distributed.deconvolve_file(inp, out, psf=psf, overwrite=True, **RL)
    assert io.read(out)[0].shape == SHAPE


@pytest.mark.parametrize("name", ["own.tif", "own.ome.zarr"])
def test_own_output_is_replaced(data, tmp_path, name):
    inp, psf, _ = data
    out = tmp_path / name
    io.write(out, np.zeros(SHAPE, np.float32))
    distributed.deconvolve_file(inp, out, psf=psf, **RL)
    assert io.read(out)[0].max() > 0
    distributed.deconvolve_file(inp, out, psf=psf, **RL)  # its own output, again
    assert sorted(n for n in _listing(tmp_path) if n.startswith("own")) == [name]


# ------------------------------------------------------- 2. the input inside the output


def test_input_inside_output_is_refused(tmp_path):
    vol = np.random.default_rng(1).random(SHAPE).astype(np.float32)
    inp = tmp_path / "in.ome.zarr"
    io.write(inp, vol)
    (tmp_path / "alias.ome.zarr").symlink_to(inp)
    sub = tmp_path / "sub"
    sub.mkdir()
    cases = [(inp / "0", inp, "contains the input"),                       # issue's example
             (inp, inp / "res.ome.zarr", "lies inside the input"),
             (inp / "0", tmp_path / "alias.ome.zarr", "contains the input"),  # symlink
             (inp, sub / ".." / "in.ome.zarr", "is the input")]               # ..
    for source, out, why in cases:
        r = _cli("deconvolve", source, out, "--method", "rl", "--psf", tmp_path / "psf.tif",
                 "--no-progress")
        assert r.exit_code == 1 and why in _one_line(r.output), (source, out, r.output)
        with pytest.raises(io.ImageIOError, match=why):
            distributed.deconvolve_file(source, out, psf=_psf(), **RL)
    np.testing.assert_array_equal(io.read(inp)[0], vol)
    assert _listing(inp) == sorted([".rln_fast", "0", "zarr.json"])


# ------------------------------------------------------- 3. one writer per output

_HOLD_THEN_RUN = """
    import os, sys, time
    from pathlib import Path
    from rln_fast import distributed, io
    inp, psf, out, ready, go = sys.argv[1:6]
    lock = io.claim_output(out)            # what a run holds from its start
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.05)
    distributed.deconvolve_file(inp, out, psf=psf, method="rl", num_iter=2, tile=(8, 24, 24),
                                progress=False)
    lock.release()
"""


def test_second_writer_is_refused_naming_the_holder(data, tmp_path):
    inp, psf, vol = data
    out = tmp_path / "mix.tif"
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = _child(_HOLD_THEN_RUN, str(inp), str(psf), str(out), str(ready), str(go))
    try:
        _wait_for(ready, first)
        second = subprocess.run(
            [sys.executable, "-m", "rln_fast.cli", "deconvolve", str(inp), str(out),
             "--tile", "16", "32", "32", "--no-progress"],
            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
            timeout=300)
        assert second.returncode == 1
        line = _one_line(second.stderr)
        assert "another run is writing it" in line and f"pid {first.pid} on " in line
        go.touch()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
    assert sorted(n for n in _listing(tmp_path) if n.startswith("mix")) == ["mix.tif"]
    alone = tmp_path / "alone.tif"  # the same run with nobody else around
    distributed.deconvolve_file(inp, alone, psf=psf, **RL)
    np.testing.assert_array_equal(io.read(out)[0], io.read(alone)[0])


def test_lock_file_that_is_not_ours_is_refused(data, tmp_path):
    inp, psf, _ = data
    (tmp_path / "o.tif.lock").write_text("my shopping list")
    with pytest.raises(io.ImageIOError, match="is not an rln_fast lock"):
        distributed.deconvolve_file(inp, tmp_path / "o.tif", psf=psf, **RL)
    assert (tmp_path / "o.tif.lock").read_text() == "my shopping list"


# ------------------------------------------------ kill -9, stale lock, resume bit-exact

_KILLED_AFTER_TWO_BLOCKS = """
    import os, signal, sys
    from rln_fast import distributed, io
    inp, psf, out = sys.argv[1:4]
    write, done = io.OutputVolume.write_block, []
    def write_then_die(self, index, data):
        write(self, index, data)
        done.append(index)
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    io.OutputVolume.write_block = write_then_die
    distributed.deconvolve_file(inp, out, psf=psf, method="rl", num_iter=2, tile=(8, 24, 24),
                                progress=False)
"""


@pytest.mark.parametrize("name", ["k.ome.zarr"])
def test_kill_9_then_rerun_takes_the_lock_and_resumes_bit_exact(data, tmp_path, name):
    inp, psf, _ = data
    out = tmp_path / name
    child = _child(_KILLED_AFTER_TWO_BLOCKS, str(inp), str(psf), str(out))
    assert child.wait(timeout=300) == -9, child.stderr.read()
    assert io._lock_info(tmp_path / f"{name}.lock")["pid"] == child.pid  # left behind
    summary = distributed.deconvolve_file(inp, out, psf=psf, **RL)
    assert summary["resumed_blocks"] == 2 and summary["blocks"] == 8
    fresh = tmp_path / "fresh.ome.zarr"
    distributed.deconvolve_file(inp, fresh, psf=psf, **RL)
    np.testing.assert_array_equal(io.read(out)[0], io.read(fresh)[0])
    assert sorted(n for n in _listing(tmp_path) if n.startswith("k.")) == [name]


# ------------------------------------------------------- 4. failed runs clean up


def _truncated_tiff(tmp_path: Path, imagej: bool) -> Path:
    path = tmp_path / ("ij.tif" if imagej else "plain.tif")
    tifffile.imwrite(path, np.ones(SHAPE, np.uint16), imagej=imagej,
                     **({"metadata": {"axes": "ZYX"}} if imagej else {}))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("imagej", [False, True])
def test_truncated_input_fails_before_anything_is_reserved(tmp_path, imagej):
    inp = _truncated_tiff(tmp_path, imagej)
    out = tmp_path / "out" / "o.tif"
    out.parent.mkdir()
    r = _cli("deconvolve", inp, out, "--method", "rl", "--psf", "none.tif", "--no-progress")
    line = _one_line(r.output)
    assert r.exit_code == 1 and "the file ends early" in line and "2-D" not in line
    with pytest.raises(io.ImageIOError, match="the file ends early"):
        distributed.deconvolve_file(inp, out, psf=_psf(), **RL)
    assert _listing(out.parent) == []


def test_failure_without_finished_blocks_removes_everything_and_says_so(data, tmp_path,
                                                                        monkeypatch):
    inp, psf, _ = data

    def fail(self, block, callback=None):
        raise ValueError("bad block")

    monkeypatch.setattr(distributed.BlockJob, "compute", fail)
    r = _cli("deconvolve", inp, tmp_path / "o.ome.zarr", "--method", "rl", "--psf", psf,
             "--tile", 8, 24, 24, "--no-progress")
    line = _one_line(r.output)
    assert r.exit_code == 1 and "bad block" in line and "nothing was kept" in line
    assert _listing(tmp_path) == ["in.tif", "psf.tif"]


def test_disk_full_keeps_blocks_and_previous_output(data, tmp_path, monkeypatch):
    inp, psf, _ = data
    out = tmp_path / "o.tif"
    old = np.full(SHAPE, 7, np.float32)
    io.write(out, old)
    write, calls = io.OutputVolume._write_tiff_block, []

    def full_disk(self, key, box, arr):
        calls.append(box)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, key, box, arr)

    monkeypatch.setattr(io.OutputVolume, "_write_tiff_block", full_disk)
    r = _cli("deconvolve", inp, out, "--method", "rl", "--psf", psf, "--num-iter", 2,
             "--tile", 8, 24, 24, "--no-progress")
    line = _one_line(r.output)
    assert r.exit_code == 1 and "no space left" in line
    assert "3 of 8 finished blocks are kept" in line and "rerun the same command" in line
    np.testing.assert_array_equal(io.read(out)[0], old)
    assert not (tmp_path / "o.tif.lock").exists()
    monkeypatch.undo()
    r = _cli("deconvolve", inp, out, "--method", "rl", "--psf", psf, "--num-iter", 2,
             "--tile", 8, 24, 24, "--no-progress")
    assert r.exit_code == 0 and "3 kept from an interrupted run" in r.output, r.output


def test_imagej_plane_of_4_gib_is_refused_before_any_file(tmp_path):
    with pytest.raises(io.ImageIOError, match="ImageJ TIFF holds planes under 4 GiB; write "
                                              r"\.ome\.tif \(BigTIFF\)"):
        io.create_output(tmp_path / "big.tif", (1, 32768, 32768), np.float32, (1, 4096, 4096))
    assert _listing(tmp_path) == []


# ------------------------------------------------------- 5. the budget is the process's


def test_file_budget_leaves_room_for_the_run_overhead():
    job = distributed.BlockJob("rl", (6, 10, 10), False, psf=np.ones((3, 5, 5), np.float32),
                               device="cpu")
    budget = tiling.parse_memory("256MB")
    core, _ = distributed._plan(job, (512, 512, 512), None, "256MB")
    box = [c + 2 * h + p - 1 for c, h, p in zip(core, job.halo, (3, 5, 5), strict=True)]
    assert np.prod(box) * tiling.RL_BYTES_PER_VOXEL <= budget - tiling.RUN_OVERHEAD_BYTES
    assert distributed._slab_voxels("256MB") * tiling.PASS_BYTES_PER_VOXEL <= budget // 2
    with pytest.raises(ValueError, match=r"below the 112 MiB a run needs besides its tiles"):
        distributed._plan(job, (512, 512, 512), None, "64MB")


def test_rl_blocks_do_not_keep_one_otf_per_shape(data, tmp_path):
    from rln_fast import rl

    inp, psf, _ = data
    rl.clear_otf_cache()
    distributed.deconvolve_file(inp, tmp_path / "o.tif", psf=psf,
                                **{**RL, "tile": (6, 20, 20)})  # blocks of several shapes
    assert len(rl._OTF_CACHE) <= 1


# ------------------------------------------------------- 6. the official checkpoint


def test_checkpoint_import_reads_only_the_model_tensors(tmp_path, monkeypatch):
    from rln_fast.models import tf_checkpoint as tfc
    from rln_fast.models.rln import RLN
    from tests.test_rln import CKPT
    from tests.test_tf_checkpoint import _field_bytes, _field_fixed32, _field_varint, write_bundle

    if not Path(f"{CKPT}.index").exists():
        pytest.skip("the official checkpoint is not here")
    tensors = tfc.read_tf_checkpoint(CKPT)
    end = sum(a.nbytes for a in tensors.values())
    shape = _field_bytes(2, _field_varint(1, 1 << 28))  # 1 GiB of float32, declared
    huge = (_field_varint(1, 1) + _field_bytes(2, shape) + _field_varint(4, end)
            + _field_varint(5, 1 << 30) + _field_fixed32(6, 0))
    prefix = tmp_path / "model.ckpt"
    write_bundle(prefix, tensors, raw_entries={"zz_extra/huge": huge})
    with open(f"{prefix}.data-00000-of-00001", "r+b") as f:
        f.truncate(end + (1 << 30))  # sparse: the declared bytes are there, costing no disk
    read = []
    real = tfc._read_tensor
    monkeypatch.setattr(tfc, "_read_tensor", lambda e, *a: (read.append(e.name), real(e, *a))[1])
    model = RLN.from_official_checkpoint(prefix)
    assert "zz_extra/huge" not in read and len(read) < len(tensors)
    ref = RLN.from_official_checkpoint(CKPT)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_sizes_are_checked_before_allocating(tmp_path):
    from rln_fast.models import tf_checkpoint as tfc
    from tests.test_tf_checkpoint import _field_bytes, _field_fixed32, _field_varint, write_bundle

    shape = _field_bytes(2, _field_varint(1, 2_013_265_920))  # 7.5 GiB of float32
    huge = (_field_varint(1, 1) + _field_bytes(2, shape) + _field_varint(4, 8)
            + _field_varint(5, 8_053_063_680) + _field_fixed32(6, 0))
    prefix = tmp_path / "model.ckpt"
    write_bundle(prefix, {"a": np.ones(2, np.float32)}, raw_entries={"b/huge": huge})
    with pytest.raises(tfc.CheckpointError) as e:
        tfc.read_tf_checkpoint(prefix)
    assert "'b/huge'" in str(e.value) and "runs past the end" in str(e.value)
    assert "\n" not in str(e.value)


# ------------------------------------------------------- 7. CLI and API agree


def _tif(tmp_path: Path, name: str, arr: np.ndarray) -> Path:
    path = tmp_path / name
    tifffile.imwrite(path, arr)
    return path


@pytest.mark.parametrize("dtype,word", [(np.complex64, "take the real part"),
                                        (np.bool_, "cast it to uint8")])
def test_complex_and_bool_refused_alike(tmp_path, dtype, word):
    arr = np.ones(SHAPE, dtype)
    inp = _tif(tmp_path, "x.tif", arr)
    r = _cli("deconvolve", inp, tmp_path / "o.tif", "--tile", 16, 32, 32, "--no-progress")
    line = _one_line(r.output)
    assert r.exit_code == 1 and word in line and "must hold real numbers" in line
    with pytest.raises(TypeError, match=word) as e:
        rln_deconvolve(arr, progress=False)
    assert str(e.value).split("volume ", 1)[1] in line
    assert _listing(tmp_path) == ["x.tif"]


def test_object_dtype_is_one_clear_error():
    with pytest.raises(TypeError, match="got dtype object; convert it to numbers"):
        rln_deconvolve(np.empty(SHAPE, object), progress=False)


def test_big_endian_accepted_alike(tmp_path):
    vol = np.random.default_rng(2).random((8, 32, 32)).astype(">f4")
    inp = tmp_path / "be.tif"
    tifffile.imwrite(inp, vol, byteorder=">")
    r = _cli("deconvolve", inp, tmp_path / "o.tif", "--tile", 8, 32, 32, "--no-progress")
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(io.read(tmp_path / "o.tif")[0],
                               rln_deconvolve(vol, progress=False), rtol=1e-5, atol=1e-5)


def test_big_endian_array_in_rl():
    vol = np.random.default_rng(3).random((8, 24, 24)).astype(np.float32)
    np.testing.assert_array_equal(
        richardson_lucy(vol.astype(">f4"), _psf(), num_iter=2, progress=False),
        richardson_lucy(vol, _psf(), num_iter=2, progress=False))


def test_huge_values_in_rl_one_line_alike(tmp_path):
    vol = np.full((8, 24, 24), 3e37, np.float32)
    inp = _tif(tmp_path, "big.tif", vol)
    io.write(tmp_path / "psf.tif", _psf())
    r = _cli("deconvolve", inp, tmp_path / "o.tif", "--method", "rl", "--psf",
             tmp_path / "psf.tif", "--no-progress")
    line = _one_line(r.output)
    assert r.exit_code == 1 and "too large for Richardson-Lucy in float32" in line
    assert "eps" not in line
    with pytest.raises(ValueError, match="too large for Richardson-Lucy in float32"):
        richardson_lucy(vol, _psf(), num_iter=2, progress=False)
    assert sorted(_listing(tmp_path)) == ["big.tif", "psf.tif"]


def test_corrupt_pt_short_message_and_malicious_pt_never_runs(tmp_path, data):
    inp, _, _ = data
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model" * 50)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "rln_fast.RLN", "state_dict": Evil()}, evil)
    for model in (bad, evil):
        r = _cli("deconvolve", inp, tmp_path / "o.tif", "--model", model, "--no-progress")
        line = _one_line(r.output)
        assert r.exit_code == 1 and "is not a readable rln_fast model file" in line
        assert len(line) < 300 and "weights_only" not in line
    assert not marker.exists()


def test_all_zero_volume_gives_zeros_alike(tmp_path):
    zeros = np.zeros((8, 32, 32), np.uint16)
    assert not rln_deconvolve(zeros, progress=False).any()
    inp = _tif(tmp_path, "z.tif", zeros)
    for norm in ("global", "none"):
        r = _cli("deconvolve", inp, tmp_path / "o.tif", "--tile", 8, 16, 16, "--normalize",
                 norm, "--no-progress")
        assert r.exit_code == 0, r.output
        assert not io.read(tmp_path / "o.tif")[0].any()

"""Tests of the TensorFlow-free V2 checkpoint reader, on the official RLN and synthetic bundles."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from rln_fast.models import tf_checkpoint as tfc
from rln_fast.models.tf_checkpoint import (
    CheckpointError,
    crc32c,
    decode_varint,
    list_tf_checkpoint,
    mask_crc32c,
    read_tf_checkpoint,
    unmask_crc32c,
)

OFFICIAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "official_rln"
OFFICIAL_PREFIX = OFFICIAL_DIR / "model.ckpt"
OFFICIAL_FILES = ("model.ckpt.index", "model.ckpt.data-00000-of-00001")

needs_official = pytest.mark.skipif(
    not all((OFFICIAL_DIR / f).is_file() for f in OFFICIAL_FILES),
    reason=f"official RLN checkpoint not present in {OFFICIAL_DIR}",
)


# --------------------------------------------------------------------------- synthetic bundle writer
# A tiny independent encoder of the same format, so every reader path is
# tested without ../shared and with features the official file lacks (several
# shards and data blocks, other dtypes).

_DT = {
    "float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6,
    "complex64": 8, "int64": 9, "bool": 10, "uint16": 17, "float16": 19,
}  # fmt: skip


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _field_fixed32(number: int, value: int) -> bytes:
    return _varint(number << 3 | 5) + value.to_bytes(4, "little")


def _entry_proto(dtype: int, shape: tuple[int, ...], shard: int, offset: int, data: bytes) -> bytes:
    shape_msg = b"".join(_field_bytes(2, _field_varint(1, d)) for d in shape)
    out = _field_varint(1, dtype) + _field_bytes(2, shape_msg)
    if shard:  # proto3 omits zero scalars
        out += _field_varint(3, shard)
    if offset:
        out += _field_varint(4, offset)
    if data:
        out += _field_varint(5, len(data))
    return out + _field_fixed32(6, mask_crc32c(crc32c(data)))


def _block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out = bytearray()
    restarts = []
    prev = b""
    for i, (key, value) in enumerate(entries):
        if i % restart_interval == 0:
            restarts.append(len(out))
            shared = 0
        else:
            shared = 0
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        out += key[shared:] + value
        prev = key
    restarts = restarts or [0]
    out += b"".join(r.to_bytes(4, "little") for r in restarts)
    return bytes(out + len(restarts).to_bytes(4, "little"))


def _append_block(table: bytearray, contents: bytes) -> bytes:
    """Append block + trailer, return its encoded handle."""
    handle = _varint(len(table)) + _varint(len(contents))
    crc = mask_crc32c(crc32c(contents + b"\x00"))
    table += contents + b"\x00" + crc.to_bytes(4, "little")
    return handle


def write_bundle(
    prefix: Path,
    tensors: dict[str, np.ndarray],
    num_shards: int = 1,
    block_entries: int = 3,
    raw_entries: dict[str, bytes] | None = None,
    header: bytes | None = None,
) -> None:
    """Write ``tensors`` as a V2 bundle (round-robin over shards); ``raw_entries`` adds hand-made protos."""
    shards = [bytearray() for _ in range(num_shards)]
    entries: dict[bytes, bytes] = {}
    for i, (name, array) in enumerate(sorted(tensors.items())):
        shard = i % num_shards
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        entries[name.encode()] = _entry_proto(
            _DT[array.dtype.name], array.shape, shard, len(shards[shard]), data
        )
        shards[shard] += data
    for name, proto in (raw_entries or {}).items():
        entries[name.encode()] = proto
    if header is None:
        header = _field_varint(1, num_shards) + _field_bytes(3, _field_varint(1, 1))
    entries[b""] = header
    ordered = sorted(entries.items())

    table = bytearray()
    index_entries = []
    for start in range(0, len(ordered), block_entries):
        chunk = ordered[start : start + block_entries]
        index_entries.append((chunk[-1][0], _append_block(table, _block(chunk, 2))))
    metaindex = _append_block(table, _block([], 1))
    index = _append_block(table, _block(index_entries, 1))
    footer = (metaindex + index).ljust(40, b"\x00") + (0xDB4775248B80FB57).to_bytes(8, "little")
    Path(f"{prefix}.index").write_bytes(bytes(table + footer))
    for shard, data in enumerate(shards):
        Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}").write_bytes(bytes(data))


def _synthetic_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "conv/kernel": rng.standard_normal((3, 3, 3, 2, 4)).astype(np.float32),
        "conv/kernel/Adam": rng.standard_normal((3, 3, 3, 2, 4)).astype(np.float32),
        "conv/kernel/Adam_1": rng.random((3, 3, 3, 2, 4)).astype(np.float32),
        "bn/moving_variance": rng.random(4).astype(np.float32) + 0.5,
        "big": rng.standard_normal(5000).astype(np.float32),  # > vectorised crc threshold
        "scalar": np.array(0.25, dtype=np.float32),
        "double": rng.standard_normal((2, 3)),
        "int32": np.arange(-3, 3, dtype=np.int32),
        "int64": np.array([-(2**40), 7], dtype=np.int64),
        "step": np.array(50000, dtype=np.int64),
        "uint8": np.arange(7, dtype=np.uint8),
        "int16": np.array([-5, 300], dtype=np.int16),
        "int8": np.array([-1, 2], dtype=np.int8),
        "uint16": np.array([65535], dtype=np.uint16),
        "half": np.array([1.5, -2.0], dtype=np.float16),
        "complex": np.array([1 + 2j], dtype=np.complex64),
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    tensors = _synthetic_tensors()
    prefix = tmp_path / "syn" / "model.ckpt"
    prefix.parent.mkdir()
    write_bundle(prefix, tensors, num_shards=2)
    return prefix, tensors


@pytest.fixture(params=["synthetic", pytest.param("official", marks=needs_official)])
def bundle_copy(request, tmp_path: Path) -> tuple[Path, str]:
    """A writable copy of a checkpoint and one of its tensor names, for corruption tests."""
    prefix = tmp_path / "copy" / "model.ckpt"
    prefix.parent.mkdir()
    if request.param == "official":
        for name in OFFICIAL_FILES:
            shutil.copyfile(OFFICIAL_DIR / name, prefix.parent / name)
        return prefix, "update/init_w_4/u_7"
    write_bundle(prefix, _synthetic_tensors())
    return prefix, "conv/kernel"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _data_file(prefix: Path) -> Path:
    return Path(f"{prefix}.data-00000-of-00001")


# --------------------------------------------------------------------------- primitives


def test_crc32c_known_vectors() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4 test vectors
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("n", [1, 255, 4095, 4096, 4097, 65536 + 17, 200_003])
def test_crc32c_vectorised_matches_bitwise(n: int) -> None:
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert crc32c(data) == _crc32c_bitwise(data)


def test_crc32c_continuation() -> None:
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    assert crc32c(data[7000:], crc32c(data[:7000])) == crc32c(data)


def test_mask() -> None:
    assert mask_crc32c(0) == 0xA282EAD8
    assert mask_crc32c(1) == 0xA284EAD8  # 1 rotated right by 15 is bit 17
    assert mask_crc32c(0x8000) == 0xA282EAD9  # bit 15 rotates to bit 0
    for crc in (0, 1, 0xE3069283, 0xFFFFFFFF, 0x5D7A3B1C):
        assert unmask_crc32c(mask_crc32c(crc)) == crc
        assert 0 <= mask_crc32c(crc) <= 0xFFFFFFFF


@pytest.mark.parametrize(
    ("encoded", "value"),
    [
        (b"\x00", 0),
        (b"\x01", 1),
        (b"\x7f", 127),
        (b"\x80\x01", 128),
        (b"\xac\x02", 300),
        (b"\xff\xff\xff\xff\x0f", 0xFFFFFFFF),
        (b"\xff" * 9 + b"\x01", 2**64 - 1),
    ],
)
def test_decode_varint(encoded: bytes, value: int) -> None:
    assert decode_varint(b"\xaa" + encoded + b"\x05", 1) == (value, 1 + len(encoded))


def test_decode_varint_errors() -> None:
    with pytest.raises(ValueError, match="past the end"):
        decode_varint(b"\x80\x80")
    with pytest.raises(ValueError, match="longer than 5"):
        decode_varint(b"\xff" * 6, 0, max_bytes=5)


# --------------------------------------------------------------------------- synthetic bundles


def test_synthetic_round_trip(synthetic: tuple[Path, dict[str, np.ndarray]]) -> None:
    prefix, tensors = synthetic
    listing = list_tf_checkpoint(prefix)
    assert listing == {k: (str(v.dtype), v.shape) for k, v in tensors.items()}
    arrays = read_tf_checkpoint(prefix)
    assert arrays.keys() == tensors.keys()
    for name, expected in tensors.items():
        got = arrays[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected)
    arrays["scalar"][...] = 3  # returned arrays are writable copies
    subset = read_tf_checkpoint(prefix, ["int64", "big"])
    assert list(subset) == ["int64", "big"]
    assert list(read_tf_checkpoint(prefix, "step")) == ["step"]


def test_prefix_forms(synthetic: tuple[Path, dict[str, np.ndarray]]) -> None:
    prefix, _ = synthetic
    expected = list_tf_checkpoint(prefix)
    assert list_tf_checkpoint(f"{prefix}.index") == expected
    assert list_tf_checkpoint(f"{prefix}.data-00001-of-00002") == expected
    assert list_tf_checkpoint(prefix.parent) == expected
    assert read_tf_checkpoint(str(prefix.parent), ["scalar"])["scalar"] == 0.25
    shutil.copyfile(f"{prefix}.index", prefix.parent / "other.index")
    with pytest.raises(CheckpointError, match=r"2 \*\.index files"):
        list_tf_checkpoint(prefix.parent)


def test_unsupported_dtypes(tmp_path: Path) -> None:
    prefix = tmp_path / "m"
    protos = {
        "text": _field_varint(1, 7) + _field_fixed32(6, mask_crc32c(0)),
        "weird": _field_varint(1, 99) + _field_fixed32(6, mask_crc32c(0)),
    }
    write_bundle(prefix, {"w": np.ones(2, np.float32)}, raw_entries=protos)
    listing = list_tf_checkpoint(prefix)
    assert listing["text"] == ("tf.string", ())
    assert listing["weird"] == ("tf.dtype_enum_99", ())
    assert read_tf_checkpoint(prefix, ["w"])["w"].tolist() == [1.0, 1.0]
    with pytest.raises(CheckpointError, match=r"'weird'.*dtype.*99"):
        read_tf_checkpoint(prefix, ["weird"])
    with pytest.raises(CheckpointError, match=r"'text'.*tf\.string"):
        read_tf_checkpoint(prefix)


def test_size_shape_mismatch(tmp_path: Path) -> None:
    prefix = tmp_path / "m"
    data_proto = _entry_proto(1, (3,), 0, 0, b"\x00" * 8)
    write_bundle(prefix, {}, raw_entries={"w": data_proto})
    Path(f"{prefix}.data-00000-of-00001").write_bytes(b"\x00" * 8)
    with pytest.raises(CheckpointError, match=r"'w' stores 8 bytes.*needs 12"):
        read_tf_checkpoint(prefix)


def test_sliced_and_big_endian_refused(tmp_path: Path) -> None:
    sliced = _field_varint(1, 1) + _field_bytes(7, b"")
    write_bundle(tmp_path / "a", {}, raw_entries={"part": sliced})
    with pytest.raises(CheckpointError, match=r"'part'.*partitioned"):
        list_tf_checkpoint(tmp_path / "a")
    write_bundle(tmp_path / "b", {}, header=_field_varint(1, 1) + _field_varint(2, 1))
    with pytest.raises(CheckpointError, match="big-endian"):
        list_tf_checkpoint(tmp_path / "b")


def test_truncated_data(bundle_copy: tuple[Path, str]) -> None:
    prefix, _ = bundle_copy
    data = _data_file(prefix)
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated") as err:
        read_tf_checkpoint(prefix)
    assert str(data) in str(err.value)


def test_truncated_index(bundle_copy: tuple[Path, str]) -> None:
    prefix, _ = bundle_copy
    index = Path(f"{prefix}.index")
    index.write_bytes(index.read_bytes()[:30])
    with pytest.raises(CheckpointError, match="too short"):
        list_tf_checkpoint(prefix)


# --------------------------------------------------------------------------- corruption and usage errors


def test_tensor_crc_mismatch(bundle_copy: tuple[Path, str]) -> None:
    prefix, name = bundle_copy
    entry = tfc._load_bundle(prefix).entries[name]
    _flip(_data_file(prefix), entry.offset + entry.size // 2)
    list_tf_checkpoint(prefix)  # the index is intact
    with pytest.raises(CheckpointError, match=rf"crc32c mismatch for tensor '{re.escape(name)}'"):
        read_tf_checkpoint(prefix)


def _first_data_block(index: Path) -> tfc._BlockHandle:
    table = index.read_bytes()
    _, index_handle = tfc._read_footer(table, index)
    block = tfc._read_block(table, index_handle, index, "index block")
    _, value = next(tfc._iter_block_entries(block))
    return tfc._decode_block_handle(value)[0]


def test_block_crc_mismatch(bundle_copy: tuple[Path, str]) -> None:
    prefix, _ = bundle_copy
    index = Path(f"{prefix}.index")
    handle = _first_data_block(index)
    _flip(index, handle.offset + handle.size // 2)
    with pytest.raises(CheckpointError, match="crc32c mismatch in data block") as err:
        list_tf_checkpoint(prefix)
    assert str(index) in str(err.value)


def test_snappy_block_refused(bundle_copy: tuple[Path, str]) -> None:
    prefix, _ = bundle_copy
    index = Path(f"{prefix}.index")
    handle = _first_data_block(index)
    table = bytearray(index.read_bytes())
    end = handle.offset + handle.size
    table[end] = 1  # snappy; recompute the crc so only the compression check can fire
    crc = mask_crc32c(crc32c(bytes(table[handle.offset : end + 1])))
    table[end + 1 : end + 5] = crc.to_bytes(4, "little")
    index.write_bytes(bytes(table))
    with pytest.raises(CheckpointError, match="snappy"):
        list_tf_checkpoint(prefix)


def test_missing_data_file(bundle_copy: tuple[Path, str]) -> None:
    prefix, name = bundle_copy
    data = _data_file(prefix)
    data.unlink()
    assert name in list_tf_checkpoint(prefix)  # listing needs only the index
    with pytest.raises(CheckpointError, match="data shard not found") as err:
        read_tf_checkpoint(prefix, [name])
    assert str(data) in str(err.value)


def test_wrong_prefix(bundle_copy: tuple[Path, str]) -> None:
    prefix, _ = bundle_copy
    wrong = prefix.parent / "modle.ckpt"
    with pytest.raises(CheckpointError, match="index not found") as err:
        read_tf_checkpoint(wrong)
    assert f"{wrong}.index" in str(err.value)
    with pytest.raises(CheckpointError, match=r"no \*\.index"):
        read_tf_checkpoint(prefix.parent.parent)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    index = tmp_path / "notes.index"
    index.write_bytes(b"this is not a LevelDB table\n" * 10)
    with pytest.raises(CheckpointError, match="bad table magic") as err:
        read_tf_checkpoint(index)
    assert str(index) in str(err.value)


def test_unknown_name(bundle_copy: tuple[Path, str]) -> None:
    prefix, name = bundle_copy
    with pytest.raises(CheckpointError, match=rf"no tensor named '{re.escape(name)}X'") as err:
        read_tf_checkpoint(prefix, [name + "X"])
    assert f"close names: {name}" in str(err.value)


# --------------------------------------------------------------------------- the official checkpoint


def _readme_variables() -> dict[str, tuple[int, ...]]:
    """Rows ``| `name` | [shape] | float32 |`` of the README's variable tables."""
    text = (OFFICIAL_DIR / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| \[([\d, ]*)\] \| float32 \|$", text, re.MULTILINE)
    return {name: tuple(int(d) for d in shape.split(",") if d.strip()) for name, shape in rows}


def _is_model_variable(name: str) -> bool:
    return not name.endswith(("/Adam", "/Adam_1")) and name not in ("beta1_power", "beta2_power")


@pytest.fixture(scope="module")
def official() -> dict[str, np.ndarray]:
    return read_tf_checkpoint(OFFICIAL_PREFIX)


@needs_official
def test_official_listing_matches_readme() -> None:
    listing = list_tf_checkpoint(OFFICIAL_PREFIX)
    assert listing["estimation/init_w_3/e_7"] == ("float32", (2, 2, 2, 4, 8))
    assert listing["update/init_w_4/u_7"] == ("float32", (3, 3, 3, 16, 8))
    assert listing["batch_normalization_12/moving_variance"] == ("float32", (1,))
    assert listing["batch_normalization_16/gamma"] == ("float32", (8,))
    assert listing["input/alpha"] == ("float32", ())
    assert listing["beta2_power"] == ("float32", ())

    model = [n for n in listing if _is_model_variable(n)]
    bn = [n for n in model if n.startswith("batch_normalization")]
    conv = [n for n in model if n.startswith(("estimation/", "update/"))]
    assert len(bn) == 17 * 4 and len(conv) == 15
    assert len(model) == 17 * 4 + 15 + 2
    assert sum(n.endswith("/Adam") for n in listing) == 17 * 2 + 15

    readme = _readme_variables()
    assert len(readme) == len(listing) == 185
    assert {n: ("float32", s) for n, s in readme.items()} == listing


@needs_official
def test_official_values(official: dict[str, np.ndarray]) -> None:
    for name, array in official.items():
        assert array.dtype == np.float32 and np.isfinite(array).all(), name
    variances = [n for n in official if n.endswith("/moving_variance")]
    assert len(variances) == 17
    for name in variances:
        assert (official[name] > 0).all(), name
    conv = [
        n for n in official if _is_model_variable(n) and n.startswith(("estimation/", "update/"))
    ]
    conv_weights = sum(official[n].size for n in conv)
    assert conv_weights == 15_808  # README: 15,808 conv weights


@needs_official
def test_official_adam_steps(official: dict[str, np.ndarray]) -> None:
    beta2_power = float(official["beta2_power"])
    steps = round(math.log(beta2_power) / math.log(0.999))
    assert abs(steps - 50_000) <= 1, f"beta2_power={beta2_power!r} implies {steps} Adam steps"


@needs_official
def test_official_direct_index_path_and_dir() -> None:
    names = ["beta2_power", "update/u_1"]
    by_prefix = read_tf_checkpoint(OFFICIAL_PREFIX, names)
    by_index = read_tf_checkpoint(OFFICIAL_DIR / "model.ckpt.index", names)
    by_dir = read_tf_checkpoint(OFFICIAL_DIR, names)
    for name in names:
        np.testing.assert_array_equal(by_prefix[name], by_index[name])
        np.testing.assert_array_equal(by_prefix[name], by_dir[name])

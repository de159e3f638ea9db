"""TensorFlow-free reader for TF1 ``tf.train.Saver`` V2 checkpoint bundles (.index + .data-*).

A V2 bundle is ``<prefix>.index``, a LevelDB table mapping tensor names to
``BundleEntryProto`` records (dtype, shape, shard, offset, size, crc32c), plus
``<prefix>.data-NNNNN-of-MMMMM`` shards holding the raw little-endian tensor
bytes. The empty key holds the ``BundleHeaderProto`` (shard count, endianness).
Everything is decoded here with the standard library and numpy; every crc in
the format (block trailers, tensor bytes) is verified.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = [
    "CheckpointError",
    "crc32c",
    "decode_varint",
    "list_tf_checkpoint",
    "mask_crc32c",
    "read_tf_checkpoint",
    "unmask_crc32c",
]


class CheckpointError(ValueError):
    """A checkpoint could not be located, decoded or verified (one-line message, file named)."""


class _Malformed(ValueError):
    """A structural problem found by a low-level decoder, which does not know the file name."""


# --------------------------------------------------------------------------- crc32c

_CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reflected
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
# Below this many bytes the per-byte Python loop beats the numpy set-up cost.
_VECTOR_MIN = 4096
# The vectorised crc holds ~5 bytes of work per input byte: large inputs go in pieces.
_CRC_PIECE = 16 << 20


def _make_crc_table() -> np.ndarray:
    """crc of each single byte value, register starting at 0 (the usual reflected table)."""
    reg = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        reg = np.where(reg & 1, (reg >> 1) ^ np.uint32(_CRC32C_POLY), reg >> 1).astype(np.uint32)
    return reg


_TABLE_NP = _make_crc_table()
_TABLE = [int(v) for v in _TABLE_NP]


def _crc_raw_scalar(reg: int, data: bytes | memoryview) -> int:
    """Advance the reflected crc register over ``data`` (no pre/post inversion)."""
    table = _TABLE
    for byte in data:
        reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg


@functools.lru_cache(maxsize=32)
def _zero_shift_tables(length: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Byte-sliced tables of the linear map reg -> register after ``length`` zero bytes.

    The register update is linear over GF(2) in (register, data), so a register
    fed zeros evolves by a fixed 32x32 bit matrix; its columns are found by
    running the 32 unit vectors through ``length`` zero bytes at once.
    """
    reg = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
    for _ in range(length):
        reg = _TABLE_NP[reg & 0xFF] ^ (reg >> 8)
    byte_values = np.arange(256, dtype=np.uint32)
    tables = []
    for k in range(4):
        t = np.zeros(256, dtype=np.uint32)
        for i in range(8):
            t[(byte_values >> i) & 1 == 1] ^= reg[8 * k + i]
        tables.append([int(v) for v in t])
    return tables[0], tables[1], tables[2], tables[3]


def _crc_raw_vector(reg: int, data: bytes | memoryview) -> int:
    """Same as ``_crc_raw_scalar`` but vectorised for large inputs.

    The body is cut into K chunks of L bytes whose registers (from 0) advance
    in lock-step in numpy; by linearity
    raw(s, A || B) = raw(s, zeros(len B)) ^ raw(0, B), so the chunk results are
    folded in order with the precomputed L-zero-byte shift.
    """
    n = len(data)
    # L ~ sqrt(n) balances the L numpy steps against the K = n/L Python fold steps.
    length = 1 << max(8, min(16, (int(n**0.5) - 1).bit_length()))
    head = n % length
    reg = _crc_raw_scalar(reg, memoryview(data)[:head])
    body = np.frombuffer(data, dtype=np.uint8, offset=head)
    if body.size == 0:
        return reg
    columns = np.ascontiguousarray(body.reshape(-1, length).T).astype(np.uint32)
    chunk = np.zeros(columns.shape[1], dtype=np.uint32)
    for col in columns:
        chunk = _TABLE_NP[(chunk ^ col) & 0xFF] ^ (chunk >> 8)
    t0, t1, t2, t3 = _zero_shift_tables(length)
    for c in chunk.tolist():
        reg = t0[reg & 0xFF] ^ t1[(reg >> 8) & 0xFF] ^ t2[(reg >> 16) & 0xFF] ^ t3[reg >> 24] ^ c
    return reg


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data``; pass a previous result as ``crc`` to continue it."""
    data = memoryview(data).cast("B")
    reg = (crc ^ _U32) & _U32
    if len(data) < _VECTOR_MIN:
        reg = _crc_raw_scalar(reg, data)
    else:
        for start in range(0, len(data), _CRC_PIECE):
            piece = data[start:start + _CRC_PIECE]
            reg = (_crc_raw_scalar if len(piece) < _VECTOR_MIN else _crc_raw_vector)(reg, piece)
    return reg ^ _U32


def mask_crc32c(crc: int) -> int:
    """LevelDB/TensorFlow crc masking (rotate right 15, add a constant), as stored on disk."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask_crc32c(masked: int) -> int:
    """Inverse of :func:`mask_crc32c`."""
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


# --------------------------------------------------------------------------- wire decoding


def decode_varint(buf: bytes | memoryview, pos: int = 0, max_bytes: int = 10) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns (value, position after it)."""
    result = 0
    shift = 0
    end = min(len(buf), pos + max_bytes)
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    if pos >= len(buf):
        raise _Malformed("varint runs past the end of its buffer")
    raise _Malformed(f"varint longer than {max_bytes} bytes")


def _fixed32(buf: bytes | memoryview, pos: int) -> int:
    if pos + 4 > len(buf):
        raise _Malformed("fixed32 runs past the end of its buffer")
    return int.from_bytes(buf[pos : pos + 4], "little")


def _to_int64(value: int) -> int:
    """Protobuf int64 values arrive as 64-bit two's complement varints."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_proto(buf: bytes | memoryview) -> dict[int, list[int | bytes]]:
    """Minimal protobuf wire decoder: field number -> values (int, or bytes if length-delimited)."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = decode_varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = decode_varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise _Malformed("fixed64 field runs past the end of its message")
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = decode_varint(buf, pos)
            if pos + n > len(buf):
                raise _Malformed("length-delimited field runs past the end of its message")
            value, pos = bytes(buf[pos : pos + n]), pos + n
        elif wire == 5:
            value, pos = _fixed32(buf, pos), pos + 4
        else:  # 3/4 are deprecated groups, 6/7 do not exist: neither occurs in bundle protos
            raise _Malformed(f"unsupported protobuf wire type {wire} (field {number})")
        fields.setdefault(number, []).append(value)
    return fields


def _last_int(fields: dict[int, list[int | bytes]], number: int, default: int = 0) -> int:
    """Scalar field value (proto3: last occurrence wins, absent means default)."""
    values = fields.get(number)
    if not values:
        return default
    value = values[-1]
    if not isinstance(value, int):
        raise _Malformed(f"field {number} should be a number, found bytes")
    return value


def _messages(fields: dict[int, list[int | bytes]], number: int) -> list[bytes]:
    values = fields.get(number, [])
    if not all(isinstance(v, bytes) for v in values):
        raise _Malformed(f"field {number} should be a sub-message")
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------- dtypes

# TensorFlow DataType enum -> numpy dtype, for the types whose bundle encoding is raw bytes.
_NUMPY_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    8: np.dtype("<c8"),  # DT_COMPLEX64
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL (one byte per element)
    17: np.dtype("<u2"),  # DT_UINT16
    18: np.dtype("<c16"),  # DT_COMPLEX128
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
# Types TensorFlow knows that this reader cannot turn into numpy arrays.
_UNSUPPORTED_DTYPES: dict[int, str] = {
    7: "string",
    11: "qint8",
    12: "quint8",
    13: "qint32",
    14: "bfloat16",
    15: "qint16",
    16: "quint16",
    20: "resource",
    21: "variant",
}


def _dtype_label(enum: int) -> str:
    """numpy dtype name for readable types, else 'tf.<name>' so listings never fail on dtype."""
    if enum in _NUMPY_DTYPES:
        return str(_NUMPY_DTYPES[enum].newbyteorder("="))
    return f"tf.{_UNSUPPORTED_DTYPES.get(enum, f'dtype_enum_{enum}')}"


# --------------------------------------------------------------------------- LevelDB table

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_TRAILER_SIZE = 5  # compression type byte + masked crc32c
_COMPRESSION_NAMES = {1: "snappy", 2: "zstd"}


@dataclass(frozen=True)
class _BlockHandle:
    offset: int
    size: int


def _decode_block_handle(buf: bytes | memoryview, pos: int = 0) -> tuple[_BlockHandle, int]:
    offset, pos = decode_varint(buf, pos)
    size, pos = decode_varint(buf, pos)
    return _BlockHandle(offset, size), pos


def _read_footer(index: bytes, path: Path) -> tuple[_BlockHandle, _BlockHandle]:
    """(metaindex handle, index handle) from the fixed-size footer at the end of the table."""
    if len(index) < _FOOTER_SIZE:
        raise CheckpointError(
            f"{path}: only {len(index)} bytes, too short to be a TensorFlow checkpoint index "
            "(truncated or not a checkpoint); re-copy the checkpoint files"
        )
    footer = index[-_FOOTER_SIZE:]
    magic = int.from_bytes(footer[-8:], "little")
    if magic != _TABLE_MAGIC:
        raise CheckpointError(
            f"{path}: not a TensorFlow checkpoint index (bad table magic 0x{magic:016x}, "
            f"expected 0x{_TABLE_MAGIC:016x}; file truncated or of another kind); "
            "pass the '<prefix>.index' file of a tf.train.Saver V2 checkpoint"
        )
    try:
        metaindex, pos = _decode_block_handle(footer)
        index_handle, _ = _decode_block_handle(footer, pos)
    except _Malformed as exc:
        raise CheckpointError(
            f"{path}: corrupt table footer ({exc}); re-copy the checkpoint"
        ) from None
    return metaindex, index_handle


def _read_block(table: bytes, handle: _BlockHandle, path: Path, what: str) -> memoryview:
    """Block contents after checking bounds, trailer crc and compression type."""
    end = handle.offset + handle.size
    if end + _TRAILER_SIZE > len(table):
        raise CheckpointError(
            f"{path}: {what} at offset {handle.offset} (size {handle.size}) runs past the end of "
            f"the {len(table)}-byte file (truncated); re-copy the checkpoint"
        )
    view = memoryview(table)
    contents = view[handle.offset : end]
    ctype = table[end]
    stored = _fixed32(table, end + 1)
    # The trailer crc covers the block contents followed by the compression-type byte.
    actual = mask_crc32c(crc32c(bytes([ctype]), crc32c(contents)))
    if actual != stored:
        raise CheckpointError(
            f"{path}: crc32c mismatch in {what} at offset {handle.offset} (stored 0x{stored:08x}, "
            f"computed 0x{actual:08x}); the index file is corrupt, re-copy the checkpoint"
        )
    if ctype != 0:
        name = _COMPRESSION_NAMES.get(ctype, f"unknown type {ctype}")
        raise CheckpointError(
            f"{path}: {what} at offset {handle.offset} is {name}-compressed, which this reader "
            "does not support; re-save it with TensorFlow (tf.train.Saver writes it uncompressed)"
        )
    return contents


def _iter_block_entries(block: memoryview) -> Iterator[tuple[bytes, memoryview]]:
    """(key, value) pairs of one block, decoding the shared-prefix key compression in order."""
    if len(block) < 4:
        raise _Malformed("block shorter than its restart count")
    num_restarts = _fixed32(block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts  # entries end where the restart array begins
    if limit < 0:
        raise _Malformed(f"restart count {num_restarts} does not fit in a {len(block)}-byte block")
    restarts = {_fixed32(block, limit + 4 * i) for i in range(num_restarts)}
    key = b""
    pos = 0
    while pos < limit:
        start = pos
        shared, pos = decode_varint(block, pos, 5)
        non_shared, pos = decode_varint(block, pos, 5)
        value_len, pos = decode_varint(block, pos, 5)
        if start in restarts and shared:
            raise _Malformed(f"entry at restart point {start} shares {shared} key bytes")
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise _Malformed(f"entry at block offset {start} overruns its block")
        key = key[:shared] + bytes(block[pos : pos + non_shared])
        pos += non_shared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _iter_table(table: bytes, path: Path) -> Iterator[tuple[bytes, memoryview]]:
    """All (key, value) pairs of a LevelDB table, data block by data block."""
    metaindex, index_handle = _read_footer(table, path)
    # TF writes an empty metaindex (no filters); read it only so its crc is checked too.
    _read_block(table, metaindex, path, "metaindex block")
    index_block = _read_block(table, index_handle, path, "index block")
    try:
        handles = [_decode_block_handle(value)[0] for _, value in _iter_block_entries(index_block)]
    except _Malformed as exc:
        raise CheckpointError(
            f"{path}: corrupt index block ({exc}); re-copy the checkpoint"
        ) from None
    for handle in handles:
        block = _read_block(table, handle, path, "data block")
        try:
            yield from _iter_block_entries(block)
        except _Malformed as exc:
            raise CheckpointError(
                f"{path}: corrupt data block at offset {handle.offset} ({exc}); "
                "re-copy the checkpoint"
            ) from None


# --------------------------------------------------------------------------- bundle


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype_enum: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored


@dataclass(frozen=True)
class _Bundle:
    prefix: Path
    index_path: Path
    num_shards: int
    entries: dict[str, _Entry]

    def shard_path(self, shard_id: int) -> Path:
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    fields = _decode_proto(buf)
    if _last_int(fields, 3):
        raise _Malformed("shape has unknown rank")
    return tuple(_to_int64(_last_int(_decode_proto(d), 1)) for d in _messages(fields, 2))


def _parse_entry(name: str, value: memoryview) -> _Entry:
    fields = _decode_proto(value)
    if fields.get(7):
        raise _Malformed("partitioned (sliced) variables are not supported by this reader")
    shape_msgs = _messages(fields, 2)
    shape = _parse_shape(shape_msgs[-1]) if shape_msgs else ()
    if any(d < 0 for d in shape):
        raise _Malformed(f"shape {list(shape)} has an unknown dimension")
    return _Entry(
        name=name,
        dtype_enum=_last_int(fields, 1),
        shape=shape,
        shard_id=_last_int(fields, 3),
        offset=_to_int64(_last_int(fields, 4)),
        size=_to_int64(_last_int(fields, 5)),
        crc32c=_last_int(fields, 6),
    )


def _parse_header(value: memoryview, path: Path) -> int:
    """Number of data shards, after checking the bundle is little-endian."""
    fields = _decode_proto(value)
    if _last_int(fields, 2) != 0:
        raise CheckpointError(
            f"{path}: checkpoint was written on a big-endian machine, which this reader does not "
            "support; re-save it on a little-endian machine"
        )
    num_shards = _last_int(fields, 1)
    if num_shards < 1:
        raise CheckpointError(
            f"{path}: bundle header declares {num_shards} data shards; re-copy the checkpoint"
        )
    return num_shards


_SUFFIX_RE = re.compile(r"\.(index|meta|data-\d{5}-of-\d{5})$")


def _resolve_prefix(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """(prefix, index path) from a prefix, any of the bundle's files, or a directory."""
    path = Path(prefix)
    if path.is_dir() and not Path(f"{path}.index").is_file():
        found = sorted(path.glob("*.index"))
        if len(found) != 1:
            listing = ", ".join(p.name for p in found)
            what = f"{len(found)} *.index files ({listing})" if found else "no *.index file"
            raise CheckpointError(
                f"{path}: directory holds {what}; "
                f"pass the checkpoint prefix, e.g. {path / 'model.ckpt'}"
            )
        index_path = found[0]
        return index_path.with_suffix(""), index_path
    # Accept the name of any bundle file: users often pick the .index or .data file.
    stripped = _SUFFIX_RE.sub("", path.name)
    prefix_path = path.with_name(stripped) if stripped else path
    index_path = Path(f"{prefix_path}.index")
    if not index_path.is_file():
        raise CheckpointError(
            f"{index_path}: checkpoint index not found (looked for it given {str(prefix)!r}); "
            "pass the checkpoint prefix, e.g. 'dir/model.ckpt' for 'dir/model.ckpt.index'"
        )
    return prefix_path, index_path


def _load_bundle(prefix: str | os.PathLike) -> _Bundle:
    prefix_path, index_path = _resolve_prefix(prefix)
    try:
        table = index_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(
            f"{index_path}: cannot read checkpoint index ({exc.strerror}); check permissions"
        ) from None
    num_shards: int | None = None
    entries: dict[str, _Entry] = {}
    for key, value in _iter_table(table, index_path):
        try:
            if key == b"":
                num_shards = _parse_header(value, index_path)
                continue
            name = key.decode("utf-8")
            if name in entries:
                raise _Malformed("duplicate key")
            entries[name] = _parse_entry(name, value)
        except (_Malformed, UnicodeDecodeError) as exc:
            label = key.decode("utf-8", "replace") or "<bundle header>"
            raise CheckpointError(
                f"{index_path}: bad entry for {label!r} ({exc}); "
                "re-save the checkpoint with tf.train.Saver"
            ) from None
    if num_shards is None:
        raise CheckpointError(
            f"{index_path}: table has no bundle header (empty key), so it is not a TF V2 "
            "checkpoint bundle; pass the '<prefix>.index' of a tf.train.Saver V2 checkpoint"
        )
    for entry in entries.values():
        if not 0 <= entry.shard_id < num_shards:
            raise CheckpointError(
                f"{index_path}: tensor {entry.name!r} names data shard {entry.shard_id} but the "
                f"bundle has {num_shards}; re-copy the checkpoint"
            )
    return _Bundle(prefix_path, index_path, num_shards, entries)


def _select(bundle: _Bundle, names: Iterable[str] | None) -> list[_Entry]:
    if names is None:
        return list(bundle.entries.values())
    if isinstance(names, str):  # a lone name would otherwise be split into characters
        names = [names]
    selected = []
    for name in names:
        entry = bundle.entries.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, list(bundle.entries), n=5, cutoff=0.5)
            hint = f"close names: {', '.join(close)}" if close else f"{len(bundle.entries)} tensors"
            raise CheckpointError(
                f"{bundle.index_path}: no tensor named {name!r} in this checkpoint ({hint}); "
                "use list_tf_checkpoint() to see every name"
            )
        selected.append(entry)
    return selected


def _check_entry(entry: _Entry, file_size: int, path: Path) -> np.dtype:
    """The entry's dtype, after checking its declared size against its shape and the file."""
    dtype = _NUMPY_DTYPES.get(entry.dtype_enum)
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {entry.name!r} has dtype {_dtype_label(entry.dtype_enum)} "
            f"(TF enum {entry.dtype_enum}), which this reader cannot decode; "
            "leave it out via names="
        )
    expected = int(np.prod(entry.shape, dtype=np.int64)) * dtype.itemsize
    if entry.size != expected:
        raise CheckpointError(
            f"{path}: tensor {entry.name!r} stores {entry.size} bytes but shape "
            f"{list(entry.shape)} of {dtype.newbyteorder('=')} needs {expected}; "
            "the index is inconsistent, re-save the checkpoint"
        )
    if entry.offset < 0 or entry.offset + entry.size > file_size:
        raise CheckpointError(
            f"{path}: tensor {entry.name!r} at offset {entry.offset} (size {entry.size}) runs past "
            f"the end of the {file_size}-byte data file (truncated); re-copy the checkpoint"
        )
    return dtype


def _read_tensor(entry: _Entry, file: BinaryIO, file_size: int, path: Path) -> np.ndarray:
    dtype = _check_entry(entry, file_size, path)
    try:
        raw = bytearray(entry.size)  # owned and writable: the array below needs no extra copy
    except MemoryError:
        raise CheckpointError(
            f"{path}: tensor {entry.name!r} needs {entry.size / 2**30:.1f} GiB, more memory than "
            "is free; read fewer tensors (names=) or free memory"
        ) from None
    file.seek(entry.offset)
    if file.readinto(raw) != entry.size:
        raise CheckpointError(
            f"{path}: short read of tensor {entry.name!r}; the file changed while being read"
        )
    actual = mask_crc32c(crc32c(raw))
    if actual != entry.crc32c:
        raise CheckpointError(
            f"{path}: crc32c mismatch for tensor {entry.name!r} (stored 0x{entry.crc32c:08x}, "
            f"computed 0x{actual:08x}); the data file is corrupt, re-copy the checkpoint"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(entry.shape)
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def list_tf_checkpoint(prefix: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (numpy dtype name, shape) of every tensor, read from the index alone.

    Tensors of types this reader cannot decode are listed as ``'tf.<type>'``
    (e.g. ``'tf.string'``) rather than failing the whole listing.
    """
    bundle = _load_bundle(prefix)
    return {name: (_dtype_label(e.dtype_enum), e.shape) for name, e in bundle.entries.items()}


def read_tf_checkpoint(
    prefix: str | os.PathLike, names: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Tensors of a TF1 V2 checkpoint as numpy arrays (all, or just ``names``), crc-verified.

    ``prefix`` is ``dir/model.ckpt``, one of its files (``dir/model.ckpt.index``),
    or a directory holding exactly one ``*.index``. Only the selected tensors are read, and
    every one's declared size is checked against its shape and its data file before any is
    allocated.
    """
    bundle = _load_bundle(prefix)
    selected = _select(bundle, names)
    sizes: dict[int, int] = {}
    for shard_id in sorted({e.shard_id for e in selected}):
        path = bundle.shard_path(shard_id)
        try:
            sizes[shard_id] = path.stat().st_size
        except OSError:
            continue  # reported below, when the shard is opened
        for entry in selected:
            if entry.shard_id == shard_id:
                _check_entry(entry, sizes[shard_id], path)
    arrays: dict[str, np.ndarray] = {}
    for shard_id in sorted({e.shard_id for e in selected}):
        path = bundle.shard_path(shard_id)
        try:
            file = path.open("rb")
        except FileNotFoundError:
            raise CheckpointError(
                f"{path}: checkpoint data shard not found "
                f"(index {bundle.index_path.name} needs it); "
                "copy every '<prefix>.data-*' file next to the index"
            ) from None
        except OSError as exc:
            raise CheckpointError(
                f"{path}: cannot open checkpoint data shard ({exc.strerror})"
            ) from None
        with file:
            file_size = os.fstat(file.fileno()).st_size
            # Ascending offsets: one forward pass over the shard.
            in_shard = [e for e in selected if e.shard_id == shard_id]
            for entry in sorted(in_shard, key=lambda e: e.offset):
                arrays[entry.name] = _read_tensor(entry, file, file_size, path)
    return {e.name: arrays[e.name] for e in selected}

"""A minimal writer of genuine Nikon ND2 files (format 3.0), for the tests only.

The ``nd2`` package reads ND2 but cannot write it, and no sample file ships with the
project, so this module writes the few chunks a modern ND2 needs. The layout, as
``nd2`` 0.12 (``nd2/_parse/_chunk_decode.py``, ``_clx_lite.py``,
``_readers/_modern/modern_reader.py``) reads it, all little-endian:

* **Chunks.** Every chunk starts with a 16-byte header ``<IIQ``: the magic
  ``0x0ABECEDA``, the length of the name field and the length of the data. The name
  field holds the chunk's name (ending in ``!``), zero-padded; the data follows it.
  Chunks start on 4096-byte boundaries (zeros in between), as NIS-Elements writes them.
* **File header.** The first chunk is named ``ND2 FILE SIGNATURE CHUNK NAME01!``
  (a 32-byte name field) and its 64 data bytes start with ``Ver3.0``.
* **Image data.** Frame ``i`` (one per combination of the experiment's loops) is the
  chunk ``ImageDataSeq|i!`` with a name field of 4072 bytes, so that its data (an 8-byte
  acquisition time in ms, then the pixels) puts the pixels 4096 bytes after the chunk's
  start, where the reader memory-maps them. Pixels are stored ``(Y, X, channel,
  component)``, uncompressed.
* **Metadata**, each a chunk holding one CLX Lite record (below):
  ``ImageAttributesLV!`` (``SLxImageAttributes``: size, bits, components, frame count),
  ``ImageMetadataSeqLV|0!`` (``SLxPictureMetadata``: the calibration in µm/px and one
  plane per channel), ``ImageMetadataLV!`` (``SLxExperiment``: the loops, outermost
  first: ``NETimeLoop`` for T, ``XYPosLoop`` for P with the position names, ``ZStackLoop``
  for Z, and a ``SpectLoop`` for several channels, each nested in the previous one's
  ``ppNextLevelEx``), ``ImageTextInfoLV!`` and ``CustomData|AcqTimesCache!`` (float64
  frame times, ms).
* **Chunk map.** The last chunk, named ``ND2 FILEMAP SIGNATURE NAME 0001!``, lists every
  chunk as ``name`` + ``<QQ`` (its offset, its data length) and ends with ``ND2 CHUNK MAP
  SIGNATURE 0000001!`` + ``<Q`` (the map chunk's own offset): these 40 bytes end the file.

**CLX Lite** (:func:`clx_lite`, the inverse of ``nd2``'s decoder): a record is a type
byte, the name's length in UTF-16 code units with its terminating zero, the name
(UTF-16-LE), then the value: bool (1 byte), int32, uint32, float64, a UTF-16-LE string
ending in a zero code unit, a byte array (``<Q`` length, then the bytes), or a *level*
(``<IQ``: the number of children and the length of the record up to the end of the
children; then the children; then one ``<Q`` offset per child). A level whose children
are unnamed is a list. A name's Hungarian prefix picks the integer type (``ui``: uint32,
else int32), as in the files NIS-Elements writes.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = 0x0ABECEDA
FILE_SIGNATURE = b"ND2 FILE SIGNATURE CHUNK NAME01!"
FILEMAP_SIGNATURE = b"ND2 FILEMAP SIGNATURE NAME 0001!"
CHUNKMAP_SIGNATURE = b"ND2 CHUNK MAP SIGNATURE 0000001!"
ALIGNMENT = 4096
IMAGE_NAME_FIELD = 4072  # 16 (header) + 4072 + 8 (time stamp) = 4096: the pixels' offset
AXES = "TPZCYXS"  # the order of ND2File.sizes

# CLX Lite value types
BOOL, INT32, UINT32, DOUBLE, STRING, BYTEARRAY, LEVEL = 1, 2, 3, 6, 8, 9, 11

# Experiment loop types (nd2.structures.LoopType)
XY_POS_LOOP, Z_STACK_LOOP, SPECT_LOOP, NE_TIME_LOOP = 2, 4, 6, 8


def clx_lite(name: str, value: Any) -> bytes:
    """One CLX Lite record: ``value`` under ``name`` (dict: a level; list: a level of
    unnamed children; bytes: a byte array)."""
    head = lambda kind: struct.pack("<BB", kind, len(name) + 1) + (name + "\0").encode("utf-16-le")  # noqa: E731
    if isinstance(value, bool):
        return head(BOOL) + struct.pack("<B", value)
    if isinstance(value, int):
        return head(UINT32) + struct.pack("<I", value) if name.startswith("ui") else head(INT32) + struct.pack("<i", value)
    if isinstance(value, float):
        return head(DOUBLE) + struct.pack("<d", value)
    if isinstance(value, str):
        return head(STRING) + (value + "\0").encode("utf-16-le")
    if isinstance(value, (bytes, bytearray)):
        return head(BYTEARRAY) + struct.pack("<Q", len(value)) + bytes(value)
    if isinstance(value, (dict, list)):
        items = value.items() if isinstance(value, dict) else (("", v) for v in value)
        children = [clx_lite(k, v) for k, v in items]
        start = len(head(LEVEL)) + struct.calcsize("<IQ")
        offsets, at = [], start
        for child in children:
            offsets.append(at)
            at += len(child)
        return (head(LEVEL) + struct.pack("<IQ", len(children), at) + b"".join(children)
                + struct.pack(f"<{len(children)}Q", *offsets))
    raise TypeError(f"CLX Lite cannot hold {name}={value!r}")


def _chunk(name: bytes, data: bytes, name_field: int | None = None) -> bytes:
    field = name.ljust(name_field or len(name), b"\0")
    return struct.pack("<IIQ", MAGIC, len(field), len(data)) + field + data


def _experiment(t: int, p: int, z: int, c: int, names: list[str], period_ms: float, z_step_um: float
                ) -> dict[str, Any] | None:
    """The loops, outermost first, each nested in the previous one's ``ppNextLevelEx``."""
    loops: list[dict[str, Any]] = []
    if t > 1:
        period = {"uiCount": t, "dStart": 0.0, "dPeriod": period_ms, "dDuration": period_ms * (t - 1),
                  "dMinPeriodDiff": period_ms, "dMaxPeriodDiff": period_ms, "dAvgPeriodDiff": period_ms}
        loops.append({"eType": NE_TIME_LOOP, "uLoopPars": {"uiCount": 1, "pPeriod": [period],
                                                            "pPeriodValid": bytes([1])}})
    if p > 1:
        points = [{"dPosX": 1000.0 * i, "dPosY": 0.0, "dPosZ": 0.0, "dPFSOffset": -1.0, "dPosName": n}
                  for i, n in enumerate(names)]
        loops.append({"eType": XY_POS_LOOP, "pItemValid": bytes([1] * p),
                      "uLoopPars": {"uiCount": p, "bUseZ": False, "bRelativeXY": False, "dReferenceX": 0.0,
                                    "dReferenceY": 0.0, "Points": points}})
    if z > 1:
        high = z_step_um * (z - 1)
        loops.append({"eType": Z_STACK_LOOP, "uLoopPars": {
            "uiCount": z, "dZLow": 0.0, "dZHigh": high, "dZStep": z_step_um, "dZHome": high / 2,
            "bZInverted": False, "iType": 0, "wsZDevice": "Ti2 ZDrive"}})
    if c > 1:
        loops.append({"eType": SPECT_LOOP, "uLoopPars": {"uiCount": c, "pPlanes": {"uiCount": c}}})
    for outer, inner in zip(loops[::-1][1:], loops[::-1]):
        outer["ppNextLevelEx"] = [inner]
    return loops[0] if loops else None


def _picture_metadata(c: int, comps: int, calibration_um: float, channel_names: list[str]) -> dict[str, Any]:
    colours = (0xFF0000, 0x00FF00, 0x0000FF, 0xFFFFFF)
    planes = {}
    for i, name in enumerate(channel_names):
        spectrum = lambda nm: {"uiCount": 1, "pPoint": {"Point0": {"dWavelength": nm, "dTValue": 1.0, "eType": 1}}}  # noqa: E731
        planes[f"a{i}"] = {"uiCompCount": comps, "uiSampleIndex": i, "sDescription": name,
                           "uiColor": colours[i % len(colours)], "uiModalityMask": 0x10,
                           "pFluorescentProbe": {"m_sName": name, "m_ExcitationSpectrum": spectrum(400.0 + 100 * i),
                                                 "m_EmissionSpectrum": spectrum(450.0 + 100 * i)}}
    return {"bCalibrated": True, "dCalibration": float(calibration_um), "dObjectiveMag": 10.0,
            "dObjectiveNA": 0.45, "wsObjectiveName": "Plan Apo 10x", "dTimeMSec": 0.0, "dXPos": 0.0,
            "dYPos": 0.0, "dZPos": 0.0,
            "sPicturePlanes": {"uiCount": c, "uiCompCount": c * comps, "sPlaneNew": planes}}


def write_nd2(path: str | Path, data: np.ndarray, axes: str, calibration_um: float = 1.0,
              position_names: list[str] | None = None, channel_names: list[str] | None = None,
              period_ms: float = 60_000.0, z_step_um: float = 1.0) -> Path:
    """Write ``data`` (uint16, axes a subsequence of ``TPZCYXS`` in that order, ``S`` = 3
    colour components) as an ND2 file whose ``ND2File.asarray()`` gives it back.

    ``position_names``: one per P (default ``XY1``, ``XY2``, ...); ``channel_names``: one per C."""
    path = Path(path)
    data = np.asarray(data)
    if data.dtype != np.uint16 or data.ndim != len(axes) or "".join(a for a in AXES if a in axes) != axes \
            or not {"Y", "X"} <= set(axes):
        raise ValueError(f"write_nd2 takes uint16 data with axes in the order {AXES} (Y, X required); "
                         f"got {data.dtype} {data.shape} {axes!r}")
    full = data.reshape([data.shape[axes.index(a)] if a in axes else 1 for a in AXES])
    t, p, z, c, h, w, s = full.shape
    if s not in (1, 3):
        raise ValueError(f"S (colour components) must be 3, got {s}")
    names = list(position_names or [f"XY{i + 1}" for i in range(p)])
    channels = list(channel_names or ([f"Channel {i}" for i in range(c)] if s == 1 else ["RGB"]))
    if len(names) != p or len(channels) != c:
        raise ValueError(f"{len(names)} position name(s) for P={p}, {len(channels)} channel name(s) for C={c}")
    frames = full.reshape(t * p * z, c, h, w, s).transpose(0, 2, 3, 1, 4)  # per frame: (Y, X, C, S)
    times = [period_ms * (i // (p * z)) for i in range(len(frames))]

    chunks: list[tuple[bytes, bytes, int | None]] = []
    for i, frame in enumerate(frames):
        pixels = np.ascontiguousarray(frame, dtype="<u2").tobytes()
        chunks.append((f"ImageDataSeq|{i}!".encode(), struct.pack("<d", times[i]) + pixels, IMAGE_NAME_FIELD))
    attributes = {"uiWidth": w, "uiWidthBytes": w * 2 * c * s, "uiHeight": h, "uiComp": c * s,
                  "uiBpcInMemory": 16, "uiBpcSignificant": 16, "uiSequenceCount": len(frames),
                  "uiTileWidth": w, "uiTileHeight": h, "eCompression": 2, "dCompressionParam": 0.0,
                  "ePixelType": 1, "uiVirtualComponents": c * s}
    chunks.append((b"ImageAttributesLV!", clx_lite("SLxImageAttributes", attributes), None))
    chunks.append((b"ImageMetadataSeqLV|0!",
                   clx_lite("SLxPictureMetadata", _picture_metadata(c, s, calibration_um, channels)), None))
    experiment = _experiment(t, p, z, c, names, period_ms, z_step_um)
    if experiment is not None:
        chunks.append((b"ImageMetadataLV!", clx_lite("SLxExperiment", experiment), None))
    chunks.append((b"ImageTextInfoLV!", clx_lite("SLxImageTextInfo", {
        "TextInfoItem_5": "written by tests/nd2_writer.py", "TextInfoItem_13": "Plan Apo 10x"}), None))
    chunks.append((b"CustomData|AcqTimesCache!", np.asarray(times, "<f8").tobytes(), None))

    out = bytearray(_chunk(FILE_SIGNATURE, b"Ver3.0".ljust(64, b"\0")))
    table = bytearray()
    for name, payload, field in chunks:
        out += b"\0" * (-len(out) % ALIGNMENT)
        table += name + struct.pack("<QQ", len(out), len(payload))
        out += _chunk(name, payload, field)
    out += b"\0" * (-len(out) % ALIGNMENT)
    where = len(out)
    table += CHUNKMAP_SIGNATURE + struct.pack("<Q", where)
    out += _chunk(FILEMAP_SIGNATURE, bytes(table))
    path.write_bytes(bytes(out))
    return path

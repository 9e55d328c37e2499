"""Microscope stacks: one file, many frames (plain functions, no Ray).

A time-lapse comes off a microscope as one file holding many 2-D planes, not as one file
per frame. This module lists the planes of such a file and reads one of them at a time, so
the importers (:mod:`ipb_ray.data.importers`) can treat every plane as a frame of its own:

* **multi-page TIFF** (pages in file order are taken as time points);
* **OME-TIFF** (its OME-XML names the axes T, C, Z, Y, X, one image per stage position,
  and the physical pixel size);
* **OME-Zarr** (a ``.zarr`` folder with NGFF ``multiscales`` metadata, versions 0.4 and
  0.5; the highest resolution level is read, chunk by chunk);
* **Nikon ND2** (NIS-Elements; its experiment loops name the axes: time (T), XY
  positions (P, one position each, named as in the file), Z, and the channels (C) of
  each frame; the calibration gives the pixel size).

Every plane becomes a frame with its time index ``t``, its position (the OME image's or
ND2 point's name, or ``p<N>``), the channel ``data.channel`` and the z-plane
``data.z_plane`` (-1: the middle one). Reading is lazy: :func:`list_planes` reads metadata
only and :func:`read_plane` decodes one page, one chunked slice or one ND2 frame, so a
48 x 2908 x 2908 stack is never loaded whole (``benchmarks/stack_read.py`` measures it).

Readers: tifffile (already a dependency: it parses OME-XML and reads a TIFF page by page
without decoding the others; bioio would add a plugin system and xarray for the same
pages), zarr (the format's reference library) and nd2 (optional, ``pip install
'ipb-ray[nd2]'``: pure Python, no Nikon SDK; it memory-maps the file and reads one frame
at a time, and parses the file's own metadata (loops, position names, calibration);
bioio-nd2 would wrap the same package). A stack format whose reader is missing names
the package to install.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ND2_SUFFIX", "PLANE_AXES", "Plane", "SEQUENCE_AXES", "Stack", "StackError", "TIFF_SUFFIXES",
    "ZARR_SUFFIX", "is_stack_path", "list_planes", "read_plane",
]

#: Suffixes of the stack formats (besides plain ``.tif``/``.tiff``, which may hold one page).
ZARR_SUFFIX = ".zarr"
TIFF_SUFFIXES = (".tif", ".tiff")
ND2_SUFFIX = ".nd2"
#: Axes a stack's plane index may run over; Y, X (and S, a pixel's colour samples) stay in the plane.
PLANE_AXES = "TCZ"
#: tifffile's names for a run of pages with no meaning attached (a plain multi-page TIFF): time.
SEQUENCE_AXES = "IQ"
#: OME length units -> micrometres.
_UNIT_UM = {"µm": 1.0, "um": 1.0, "micrometer": 1.0, "micron": 1.0, "nm": 1e-3, "nanometer": 1e-3,
            "mm": 1e3, "millimeter": 1e3, "m": 1e6, "meter": 1e6, "Å": 1e-4, "angstrom": 1e-4}


class StackError(ValueError):
    """A stack that cannot be listed or read; the message names the file (and plane)."""


@dataclass(frozen=True)
class Plane:
    """One 2-D plane of a stack, as a JSON-able reference (it travels in a shard task).

    ``series``: the OME image (TIFF series), the ND2 XY position, or 0 for OME-Zarr;
    ``index``: the page within that series (TIFF), the indices of the non-YX axes
    (OME-Zarr), or the ND2 frame (sequence index) and the channel within it."""

    series: int
    index: tuple[int, ...]
    t: int
    position: str
    channel: int = 0
    z: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"series": self.series, "index": list(self.index), "t": self.t, "position": self.position,
                "channel": self.channel, "z": self.z}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Plane":
        return Plane(int(d["series"]), tuple(int(i) for i in d["index"]), int(d["t"]), str(d["position"]),
                     int(d.get("channel", 0)), int(d.get("z", 0)))

    def label(self, positions: int) -> str:
        """How the plane is named after its file: ``[t=3]``, or ``[A1 t=3]`` with several positions."""
        return f"[{self.position} t={self.t}]" if positions > 1 else f"[t={self.t}]"


@dataclass
class Stack:
    """What :func:`list_planes` found in one file."""

    path: str
    kind: str                      # "tiff" | "ome-tiff" | "ome-zarr" | "nd2"
    axes: str                      # e.g. "TCZYX" (of the first position)
    shape: tuple[int, ...]
    planes: list[Plane]
    pixel_size_um: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def positions(self) -> int:
        return len({p.position for p in self.planes})


def is_stack_path(path: Path) -> bool:
    """A path a stack could be: a TIFF or ND2 file or an OME-Zarr folder."""
    suffix = path.suffix.lower()
    return ((suffix in (*TIFF_SUFFIXES, ND2_SUFFIX) and path.is_file())
            or (suffix == ZARR_SUFFIX and path.is_dir()))


def _pick(n: int, wanted: int, axis: str, path: str, setting: str) -> int:
    """The index along an axis of length ``n`` a setting asks for (-1: the middle)."""
    if wanted < 0:
        return n // 2
    if wanted >= n:
        raise StackError(f"{path}: {setting}={wanted} but the stack has {n} {axis} plane(s) "
                         f"(0..{n - 1}); set {setting} to one of them")
    return wanted


def _planes_for(axes: str, shape: tuple[int, ...], series: int, position: str, path: str,
                channel: int, z_plane: int, flat: bool) -> list[Plane]:
    """Every (t) plane of one position: the channel and z chosen, the other axes walked.

    ``flat``: index planes by their page number within the series (TIFF), else by the
    indices of the non-YX axes (OME-Zarr)."""
    outer = [(a, n) for a, n in zip(axes, shape) if a not in "YXS"]
    for a, _ in outer:
        if a not in PLANE_AXES + SEQUENCE_AXES:
            raise StackError(f"{path}: axis {a!r} of a stack with axes {axes!r} is not supported (ipb-ray "
                             "reads T, C, Z; split the file by that axis first)")
    if sum(a in "T" + SEQUENCE_AXES for a, _ in outer) > 1:
        raise StackError(f"{path}: more than one time-like axis in {axes!r}; save it with one T axis")
    names = [a for a, _ in outer]
    sizes = [n for _, n in outer]
    fixed = {}
    if "C" in names:
        fixed["C"] = _pick(sizes[names.index("C")], channel, "channel", path, "data.channel")
    elif channel > 0:
        raise StackError(f"{path}: data.channel={channel} but the stack has one channel; leave data.channel at 0")
    if "Z" in names:
        fixed["Z"] = _pick(sizes[names.index("Z")], z_plane, "z", path, "data.z_plane")
    t_axis = next((i for i, a in enumerate(names) if a in "T" + SEQUENCE_AXES), None)
    steps = sizes[t_axis] if t_axis is not None else 1
    out = []
    for t in range(steps):
        idx = [fixed.get(a, 0) for a in names]
        if t_axis is not None:
            idx[t_axis] = t
        index = (int(np.ravel_multi_index(idx, sizes)),) if flat and sizes else tuple(idx)
        out.append(Plane(series, index, t, position, fixed.get("C", 0), fixed.get("Z", 0)))
    return out


def _ome_pixel_sizes(tif: Any) -> list[float | None]:
    """PhysicalSizeX of every OME image, in µm (None where not given)."""
    import tifffile

    try:
        images = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
    except Exception:  # no or malformed OME-XML: no pixel size
        return []
    images = images if isinstance(images, list) else [images]
    out: list[float | None] = []
    for image in images:
        pixels = image.get("Pixels", {}) if isinstance(image, dict) else {}
        size, unit = pixels.get("PhysicalSizeX"), str(pixels.get("PhysicalSizeXUnit", "µm"))
        try:
            out.append(float(size) * _UNIT_UM[unit] if size is not None else None)
        except (KeyError, TypeError, ValueError):
            out.append(None)
    return out


def _list_tiff(path: Path, channel: int, z_plane: int) -> Stack | None:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception:  # not a TIFF tifffile can open: the plain reader says why, per frame
        return None
    try:
        with tif:
            series = list(tif.series)
            if len(tif.pages) <= 1 and len(series) <= 1:
                return None  # a single frame: the plain reader takes it
            ome = tif.is_ome
            sizes = _ome_pixel_sizes(tif) if ome else []
            planes: list[Plane] = []
            axes, shape = series[0].axes, tuple(series[0].shape)
            for s, ser in enumerate(series):
                name = (ser.name or "").strip() if ome else ""
                position = name if name and ome and len(series) > 1 else f"p{s}"
                planes += _planes_for(ser.axes, tuple(ser.shape), s, position, str(path), channel, z_plane, True)
            if len(planes) <= 1:
                return None
            positions = [p.position for p in planes]
            if len(set(positions)) < len({p.series for p in planes}):  # repeated OME names: number them
                planes = [Plane(p.series, p.index, p.t, f"p{p.series}", p.channel, p.z) for p in planes]
            known = [v for v in sizes if v is not None]
            return Stack(str(path), "ome-tiff" if ome else "tiff", axes, shape, planes,
                         known[0] if known else None)
    except StackError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise StackError(f"{path}: cannot list its pages ({type(exc).__name__}: {exc})") from exc


def _ngff(path: Path) -> dict[str, Any]:
    """The NGFF ``multiscales`` entry of an OME-Zarr group (0.4: in .zattrs; 0.5: under "ome")."""
    for meta in (path / "zarr.json", path / ".zattrs"):
        if meta.is_file():
            attrs = json.loads(meta.read_text())
            attrs = attrs.get("attributes", attrs)
            scales = (attrs.get("ome") or attrs).get("multiscales")
            if scales:
                return scales[0]
    raise StackError(f"{path}: not an OME-Zarr image (no 'multiscales' in zarr.json or .zattrs); write it "
                     "with an OME-NGFF writer (ome-zarr, bioio) or point data.frames at its frames")


def _zarr_array(path: Path) -> tuple[Any, dict[str, Any]]:
    try:
        import zarr
    except ImportError as exc:
        raise StackError(f"{path}: reading OME-Zarr needs the zarr package: pip install zarr") from exc
    meta = _ngff(path)
    level = meta["datasets"][0]
    try:
        array = zarr.open_array(str(path / level["path"]), mode="r")
    except Exception as exc:
        raise StackError(f"{path}: cannot open its image {level['path']!r} ({type(exc).__name__}: {exc})") from exc
    return array, meta


def _list_zarr(path: Path, channel: int, z_plane: int) -> Stack:
    array, meta = _zarr_array(path)
    axes_meta = meta.get("axes") or [{"name": a} for a in "tczyx"[-array.ndim:]]
    axes = "".join((a["name"] if isinstance(a, dict) else str(a))[0].upper() for a in axes_meta)
    if len(axes) != array.ndim or not axes.endswith("YX"):
        raise StackError(f"{path}: axes {axes!r} do not end in Y, X for an image of shape {array.shape}")
    planes = _planes_for(axes, tuple(array.shape), 0, "p0", str(path), channel, z_plane, False)
    size = None
    for tr in meta["datasets"][0].get("coordinateTransformations", []):
        if tr.get("type") == "scale" and len(tr.get("scale", [])) == len(axes):
            unit = axes_meta[-1].get("unit", "micrometer") if isinstance(axes_meta[-1], dict) else "micrometer"
            size = float(tr["scale"][-1]) * _UNIT_UM.get(str(unit), 1.0)
    return Stack(str(path), "ome-zarr", axes, tuple(array.shape), planes, size)


#: ND2 experiment loops -> axes (a SpectLoop holds the channels, which lie inside each frame).
_ND2_LOOPS = {"TimeLoop": "T", "NETimeLoop": "T", "XYPosLoop": "P", "ZStackLoop": "Z"}


def _nd2_module(path: Path) -> Any:
    try:
        import nd2
    except ImportError as exc:
        raise StackError(f"{path}: reading ND2 needs the nd2 package: pip install 'ipb-ray[nd2]'") from exc
    return nd2


def _nd2_components(f: Any) -> tuple[int, int, int]:
    """(channels as ``ND2File.sizes`` counts them, channels in the frame, components per
    channel) of an ND2 file: 3 components per channel are RGB (S); any other count makes
    every component a channel of its own."""
    attrs = f.attributes
    n = attrs.channelCount or 1
    per = max(attrs.componentCount // n, 1)
    return (n if per == 3 else n * per), n, per


def _list_nd2(path: Path, channel: int, z_plane: int) -> Stack:
    nd2 = _nd2_module(path)
    try:
        with nd2.ND2File(path) as f:
            loops = [(_ND2_LOOPS.get(loop.type, loop.type), loop) for loop in f.experiment]
            for axis, _ in loops:
                if axis not in _ND2_LOOPS.values():
                    raise StackError(f"{path}: its {axis} loop is not supported (ipb-ray reads time, XY positions, "
                                     "Z and channels; export the file without that loop first)")
            counts = [loop.count for _, loop in loops]
            nchan, _, per = _nd2_components(f)
            samples = 3 if per == 3 else 1
            height, width = f.attributes.heightPx, f.attributes.widthPx or 0
            inner = [(a, n) for (a, _), n in zip(loops, counts) if a != "P"] + ([("C", nchan)] if nchan > 1 else [])
            axes = "".join(a for a, _ in inner) + "YX" + ("S" if samples == 3 else "")
            shape = tuple(n for _, n in inner) + (height, width) + ((3,) if samples == 3 else ())
            xy = next((loop for a, loop in loops if a == "P"), None)
            names = [(pt.name or "").strip() for pt in xy.parameters.points] if xy is not None else [""]
            if len(names) > 1 and (not all(names) or len(set(names)) < len(names)):
                names = [""] * len(names)  # missing or repeated names: number the positions
            planes = []
            for p, name in enumerate(names):
                position = name if name and len(names) > 1 else f"p{p}"
                for plane in _planes_for(axes, shape, p, position, str(path), channel, z_plane, False):
                    walked = iter(plane.index)
                    coords = [p if a == "P" else next(walked) for a, _ in loops]
                    seq = int(np.ravel_multi_index(coords, counts)) if counts else 0
                    planes.append(Plane(p, (seq, plane.channel), plane.t, position, plane.channel, plane.z))
            size = None
            channels = f.metadata.channels or []
            if channels and channels[0].volume.axesCalibrated[0]:
                size = float(f.voxel_size().x)
            return Stack(str(path), "nd2", axes, shape, planes, size)
    except StackError:
        raise
    except Exception as exc:  # nd2 raises ValueError, OSError, KeyError ... for damaged files
        raise StackError(f"{path}: cannot read its ND2 metadata ({type(exc).__name__}: {exc}); "
                         "is the file truncated?") from exc


def _read_nd2(path: Path, plane: Plane, where: str) -> np.ndarray:
    """One channel of one ND2 frame, copied out of the memory map (which closes with the file)."""
    nd2 = _nd2_module(path)
    seq, comp = plane.index
    with nd2.ND2File(path) as f:
        # nd2 reads a frame the chunk map points past the end of the file as zeros: say so instead
        offsets = getattr(getattr(f, "_rdr", None), "_frame_offsets", None)
        if isinstance(offsets, dict) and f.attributes.compressionType != "lossless":
            nbytes, held = f.attributes.heightPx * (f.attributes.widthBytes or 0), path.stat().st_size
            if seq not in offsets or offsets[seq] + nbytes > held:
                raise StackError(f"{where}: frame {seq} is missing or cut short (the file holds {held} bytes; "
                                 "is it truncated?)")
        _, n, per = _nd2_components(f)
        # a frame is stored (Y, X, channel, component); nd2 hands it over as (channel, Y, X, component)
        frame = f.read_frame(seq).reshape(n, f.attributes.heightPx, f.attributes.widthPx or 0, per)
        out = np.array(frame[comp] if per == 3 else frame[comp // per, :, :, comp % per])
        del frame  # the last view of the memory map, which closes with the file
    return out


def list_planes(path: str | Path, channel: int = 0, z_plane: int = -1) -> Stack | None:
    """The planes of a stack file, or None for a file that holds one 2-D frame (or is no
    TIFF, ND2 or OME-Zarr: the plain frame reader takes those). Reads metadata only. An
    ND2 file is always a stack, even of one frame (the plain reader cannot read ND2).

    Raises :class:`StackError` naming the file for an unsupported axis, a channel or
    z-plane the stack does not have, or a file whose pages cannot be listed."""
    path = Path(path)
    if path.suffix.lower() == ZARR_SUFFIX and path.is_dir():
        return _list_zarr(path, channel, z_plane)
    if path.suffix.lower() in TIFF_SUFFIXES and path.is_file():
        return _list_tiff(path, channel, z_plane)
    if path.suffix.lower() == ND2_SUFFIX and path.is_file():
        return _list_nd2(path, channel, z_plane)
    return None


def read_plane(path: str | Path, plane: Plane | dict[str, Any]) -> np.ndarray:
    """Decode one plane of a stack (one TIFF page, one slice of the OME-Zarr's chunks, or
    one channel of one ND2 frame).

    Raises :class:`StackError` naming the file and the plane when it cannot be read (a
    truncated file, a missing chunk)."""
    path = Path(path)
    plane = Plane.from_dict(plane) if isinstance(plane, dict) else plane
    where = f"{path} plane t={plane.t} position {plane.position}"
    try:
        if path.suffix.lower() == ZARR_SUFFIX:
            array, _ = _zarr_array(path)
            out = np.asarray(array[tuple(plane.index)])
        elif path.suffix.lower() == ND2_SUFFIX:
            out = _read_nd2(path, plane, where)
        else:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                pages = tif.series[plane.series].pages
                k = plane.index[0]
                if k >= len(pages) or pages[k] is None:
                    raise StackError(f"{where}: page {k} is missing (the file holds {len(pages)} page(s) of "
                                     "this series; is it truncated?)")
                out = pages[k].asarray()
    except StackError:
        raise
    except Exception as exc:
        raise StackError(f"{where}: cannot be read ({type(exc).__name__}: {exc}); is the file truncated?") from exc
    if out.ndim not in (2, 3) or out.size == 0 or math.prod(out.shape[:2]) == 0:
        raise StackError(f"{where}: expected a 2-D plane, got shape {out.shape}")
    return out

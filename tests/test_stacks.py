"""Microscope stacks: multi-page TIFF, OME-TIFF and OME-Zarr files written by their own
libraries' writers (tifffile, zarr), and Nikon ND2 files written by tests/nd2_writer.py
(the nd2 package only reads), listed plane by plane and imported as frames."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from ipb_ray.config import load_config
from ipb_ray.data import importers
from ipb_ray.data.segmentation import FrameError, load_frame
from ipb_ray.data.stacks import StackError, list_planes, read_plane
from tests.worlds import _frame

tifffile = pytest.importorskip("tifffile")
CENTRES = ((80, 80), (260, 90), (90, 260), (270, 270))


def _planes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([_frame(rng, CENTRES) for _ in range(n)])


def write_ome_tiff(path, t=3, positions=("A1", "B2"), pixel_um=0.65, seed=0):
    """An OME-TIFF time-lapse: T planes at each stage position, one OME image per position."""
    with tifffile.TiffWriter(path, ome=True) as w:
        for i, name in enumerate(positions):
            w.write(_planes(t, seed + i), metadata={"axes": "TYX", "PhysicalSizeX": pixel_um,
                                                    "PhysicalSizeY": pixel_um, "Name": name})
    return path


def write_multipage_tiff(path, n=3, seed=5):
    """A plain multi-page TIFF: pages written one after another, no axes metadata."""
    with tifffile.TiffWriter(path) as w:
        for plane in _planes(n, seed):
            w.write(plane, metadata=None)
    return path


def write_ome_zarr(path, t=2, c=2, pixel_um=0.5, seed=7):
    """An OME-Zarr image (NGFF 0.4 metadata, axes t c y x) written with zarr's own writer;
    channel 1 holds the colonies, channel 0 is blank."""
    zarr = pytest.importorskip("zarr")
    data = np.zeros((t, c, 360, 360), np.uint8)
    data[:, 1] = _planes(t, seed)
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    arr = root.create_array("0", shape=data.shape, chunks=(1, 1, 180, 180), dtype="uint8")
    arr[:] = data
    root.attrs["multiscales"] = [{
        "version": "0.4", "name": "plate",
        "axes": [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale",
                                                                  "scale": [1.0, 1.0, pixel_um, pixel_um]}]}]}]
    return path, data


def test_ome_tiff_lists_every_time_point_at_every_position_with_its_pixel_size(tmp_path):
    path = write_ome_tiff(tmp_path / "plate.ome.tif")
    stack = list_planes(path)
    assert stack.kind == "ome-tiff" and stack.positions == 2 and stack.pixel_size_um == pytest.approx(0.65)
    assert [(p.position, p.t) for p in stack.planes] == [(w, t) for w in ("A1", "B2") for t in range(3)]
    second = _planes(3, 1)
    np.testing.assert_array_equal(read_plane(path, stack.planes[4]), second[1])  # B2, t=1, read alone
    np.testing.assert_array_equal(load_frame(path, stack.planes[4].to_dict()), second[1])


def test_plain_multipage_tiff_pages_are_time_points_and_a_single_page_is_no_stack(tmp_path):
    path = write_multipage_tiff(tmp_path / "movie.tif", n=4)
    stack = list_planes(path)
    assert stack.kind == "tiff" and stack.pixel_size_um is None
    assert [p.t for p in stack.planes] == [0, 1, 2, 3] and stack.positions == 1
    np.testing.assert_array_equal(read_plane(path, stack.planes[3]), _planes(4, 5)[3])
    tifffile.imwrite(tmp_path / "one.tif", _planes(1)[0])
    assert list_planes(tmp_path / "one.tif") is None
    with pytest.raises(FrameError, match="4 pages.*data.frames"):
        load_frame(tmp_path / "movie.tif")  # a stack read as one frame says what to do


def test_channel_and_z_are_chosen_and_a_missing_one_is_named(tmp_path):
    data = np.arange(2 * 3 * 4 * 8 * 8, dtype=np.uint16).reshape(2, 3, 4, 8, 8)
    path = tmp_path / "tczyx.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "TCZYX"})
    stack = list_planes(path, channel=2, z_plane=-1)
    assert [(p.t, p.channel, p.z) for p in stack.planes] == [(0, 2, 2), (1, 2, 2)]
    np.testing.assert_array_equal(read_plane(path, stack.planes[1]), data[1, 2, 2])
    np.testing.assert_array_equal(read_plane(path, list_planes(path, 0, 0).planes[0]), data[0, 0, 0])
    with pytest.raises(StackError, match=r"tczyx.ome.tif: data.channel=3 but the stack has 3 channel.*0..2"):
        list_planes(path, channel=3)
    with pytest.raises(StackError, match="data.z_plane=9 but the stack has 4 z"):
        list_planes(path, z_plane=9)


def test_ome_zarr_is_read_chunk_by_chunk_with_its_channel_and_scale(tmp_path):
    path, data = write_ome_zarr(tmp_path / "plate.zarr")
    stack = list_planes(path, channel=1)
    assert stack.kind == "ome-zarr" and stack.axes == "TCYX" and stack.pixel_size_um == pytest.approx(0.5)
    assert [(p.t, p.channel) for p in stack.planes] == [(0, 1), (1, 1)]
    np.testing.assert_array_equal(read_plane(path, stack.planes[1]), data[1, 1])
    (tmp_path / "bare.zarr").mkdir()
    with pytest.raises(StackError, match="bare.zarr: not an OME-Zarr image"):
        list_planes(tmp_path / "bare.zarr")


def test_a_truncated_stack_is_rejected_by_plane_with_its_reason(tmp_path):
    path = write_multipage_tiff(tmp_path / "cut.tif", n=3)
    stack = list_planes(path)
    raw = path.read_bytes()
    last = stack.planes[-1]
    with tifffile.TiffFile(path) as tif:
        offset = tif.series[0].pages[last.index[0]].dataoffsets[0]
    path.write_bytes(raw[: offset + 100])  # the last plane's pixels cut short
    rows, rejects = importers._run_frame({"path": str(path), "source": "cut.tif[t=2]", "annotations": [],
                                          "plane": last.to_dict()}, load_config(preset="demo").data, "frames")
    assert rows == [] and len(rejects) == 1
    assert rejects[0]["source"] == "cut.tif[t=2]" and "cut.tif plane t=2" in rejects[0]["reason"]
    assert "truncated" in rejects[0]["reason"]


def test_plan_frames_makes_a_frame_of_every_plane_and_routes_rows_by_time_and_position(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    write_ome_tiff(frames / "plate.ome.tif", pixel_um=0.65)
    write_multipage_tiff(frames / "movie.tif", n=2)
    table = tmp_path / "ann.csv"
    table.write_text("frame,x0,y0,x1,y1,label,frame_index,position\n"
                     "plate.ome.tif,35,35,125,125,Dense,1,B2\n"
                     "plate.ome.tif,35,35,125,125,Dense,7,B2\n"
                     "plate.ome.tif,35,35,125,125,Dense,,A1\n"
                     "movie.tif,35,35,125,125,Spread,1,\n")
    data = load_config(preset="demo", overrides=[f"data.frames={frames}"]).data
    plan = importers.plan_frames(str(frames), str(table), data)
    sources = sorted(t.items[0]["source"] for t in plan.tasks)
    assert sources == sorted([f"frames/plate.ome.tif[{w} t={t}]" for w in ("A1", "B2") for t in range(3)]
                             + ["frames/movie.tif[t=0]", "frames/movie.tif[t=1]"])
    items = {t.items[0]["source"]: t.items[0] for t in plan.tasks}
    assert [a["row"] for a in items["frames/plate.ome.tif[B2 t=1]"]["annotations"]] == [f"{table} row 2"]
    assert items["frames/plate.ome.tif[B2 t=1]"]["columns"] == {"position": "B2", "well": "B2"}
    assert items["frames/movie.tif[t=1]"]["columns"]["well"] == "movie" and items["frames/movie.tif[t=1]"]["frame_index"] == 1
    assert len(items["frames/movie.tif[t=1]"]["annotations"]) == 1
    reasons = {r["item"]: r["reason"] for r in plan.rejects}
    assert "does not hold" in reasons[f"{table} row 3"] and "t 0..2" in reasons[f"{table} row 3"]
    assert "add a frame_index column" in reasons[f"{table} row 4"]
    assert any("0.65 µm per pixel" in n and "data.pixel_size_um=" in n for n in plan.notes)
    assert len({t.key for t in plan.tasks}) == len(plan.tasks)  # one shard per plane
    rows, rejects = importers.run_shard(next(t for t in plan.tasks
                                             if t.items[0]["source"] == "frames/plate.ome.tif[B2 t=1]"), data)
    assert len(rows) == 4 and not [r for r in rejects if r["item"] == "frame"]
    assert {r["frame_index"] for r in rows} == {1} and all(r["pixel_size_um"] == pytest.approx(0.65) for r in rows)
    assert sum(r["labels"] == ["Dense"] for r in rows) == 1
    assert {json.loads(r["provenance"])["annotation"]["position"] for r in rows} == {"B2"}


def test_a_stack_without_the_asked_channel_is_rejected_at_planning_and_a_broken_tiff_per_frame(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    write_ome_tiff(frames / "plate.ome.tif", t=2, positions=("A1",))
    (frames / "broken.tif").write_bytes(b"not a tiff at all")
    data = load_config(preset="demo", overrides=["data.channel=1"]).data
    plan = importers.plan_frames(str(frames), None, data)
    assert [t.items[0]["source"] for t in plan.tasks] == ["broken.tif"]  # no plane: the plain reader's
    assert [(r["item"], r["source"]) for r in plan.rejects] == [("file", str(frames / "plate.ome.tif"))]
    assert "data.channel=1 but the stack has one channel" in plan.rejects[0]["reason"]
    rows, rejects = importers.run_shard(plan.tasks[0], data)
    assert rows == [] and "broken.tif" in rejects[0]["reason"] and "unreadable frame" in rejects[0]["reason"]


def test_preprocess_builds_a_catalog_from_stacks_with_time_position_and_pixel_size(tmp_path, ray_local):
    """`ipb preprocess` over an OME-TIFF (T=3, two positions), an OME-Zarr and a plain
    multi-page TIFF: every plane a frame, its time and position with each colony, the
    OME pixel size noted, and a blank plane rejected by name."""
    from ipb_ray.data import catalog
    from ipb_ray.distributed.preprocess import build_catalog

    frames = tmp_path / "frames"
    frames.mkdir()
    write_ome_tiff(frames / "plate.ome.tif", pixel_um=0.65)
    write_ome_zarr(frames / "plate2.zarr")  # channel 0 (data.channel's default) is blank
    write_multipage_tiff(frames / "movie.tif", n=2)
    cfg = load_config(preset="demo", overrides=[f"data.frames={frames}", "data.annotations=null",
                                                 f"data.catalog={tmp_path / 'cat'}", "split.folds=2"])
    summary = build_catalog(cfg)
    table = catalog.read_catalog(summary.catalog, ["source", "frame_index", "pixel_size_um", "provenance"])
    want = {f"plate.ome.tif[{w} t={t}]" for w in ("A1", "B2") for t in range(3)} | {"movie.tif[t=0]", "movie.tif[t=1]"}
    assert set(table.column("source").to_pylist()) == want
    assert table.num_rows == 4 * len(want)  # four colonies on every plane
    rejects = catalog.read_rejects(summary.catalog).to_pylist()
    assert {r["source"] for r in rejects if "constant" in r["reason"]} == {"plate2.zarr[t=0]", "plate2.zarr[t=1]"}
    for r in table.to_pylist():
        position = json.loads(r["provenance"])["annotation"]["position"]
        if r["source"].startswith("plate.ome.tif"):
            assert r["source"] == f"plate.ome.tif[{position} t={r['frame_index']}]"
            assert r["pixel_size_um"] == pytest.approx(0.65)
        else:
            assert r["source"] == f"movie.tif[t={r['frame_index']}]" and position == "p0"
            assert r["pixel_size_um"] == pytest.approx(cfg.data.pixel_size_um)
    assert any("plate.ome.tif" in w and "0.65 µm per pixel" in w for w in summary.warnings)


# --------------------------------------------------------------------------- Nikon ND2
# Written by tests/nd2_writer.py (a minimal ND2 3.0 writer: the nd2 package only reads).

def write_nd2_plate(path, t=3, positions=("A1", "B2"), c=2, size=(32, 40), pixel_um=0.65, seed=11):
    """An ND2 time-lapse (T, P, C, Y, X uint16) with named XY positions and a calibration."""
    from tests.nd2_writer import write_nd2

    data = np.random.default_rng(seed).integers(0, 65535, (t, len(positions), c, *size), dtype=np.uint16)
    write_nd2(path, data, "TPCYX", calibration_um=pixel_um, position_names=list(positions))
    return path, data


def write_nd2_colonies(path, t=2, positions=("A1", "B2"), pixel_um=0.65, seed=3):
    """An ND2 whose channel 0 holds the colonies of :func:`_planes` (16-bit) at every
    time point and position, and channel 1 a blank plane."""
    from tests.nd2_writer import write_nd2

    data = np.zeros((t, len(positions), 2, 360, 360), np.uint16)
    for p in range(len(positions)):
        data[:, p, 0] = _planes(t, seed + p).astype(np.uint16) * 257
    write_nd2(path, data, "TPCYX", calibration_um=pixel_um, position_names=list(positions))
    return path, data


def test_nd2_writer_makes_files_the_nd2_package_reads_back(tmp_path):
    """The test writer's files are ND2 as the nd2 package reads it: loops, names,
    calibration, channels, colour and every frame."""
    nd2 = pytest.importorskip("nd2")
    from tests.nd2_writer import write_nd2

    path, data = write_nd2_plate(tmp_path / "plate.nd2")
    with nd2.ND2File(path) as f:
        assert f.version == (3, 0) and dict(f.sizes) == {"T": 3, "P": 2, "C": 2, "Y": 32, "X": 40}
        assert [loop.type for loop in f.experiment] == ["NETimeLoop", "XYPosLoop"]
        assert [p.name for p in f.experiment[1].parameters.points] == ["A1", "B2"]
        assert f.voxel_size().x == pytest.approx(0.65) and f.dtype == np.uint16
        for seq, idx in enumerate(f.loop_indices):
            np.testing.assert_array_equal(f.read_frame(seq), data[idx["T"], idx["P"]])
    rgb = np.random.default_rng(1).integers(0, 65535, (2, 3, 8, 16, 3), dtype=np.uint16)
    write_nd2(tmp_path / "rgb.nd2", rgb, "TZYXS", calibration_um=0.5)
    with nd2.ND2File(tmp_path / "rgb.nd2") as f:
        assert dict(f.sizes) == {"T": 2, "Z": 3, "Y": 8, "X": 16, "S": 3} and f.is_rgb
        np.testing.assert_array_equal(f.asarray(), rgb)


def test_nd2_lists_every_time_point_at_every_position_and_reads_the_asked_channel(tmp_path):
    pytest.importorskip("nd2")
    path, data = write_nd2_plate(tmp_path / "plate.nd2")
    stack = list_planes(path, channel=1)
    assert stack.kind == "nd2" and stack.axes == "TCYX" and stack.shape == (3, 2, 32, 40)
    assert stack.pixel_size_um == pytest.approx(0.65) and stack.positions == 2
    assert [(p.position, p.t, p.channel) for p in stack.planes] == [(w, t, 1) for w in ("A1", "B2") for t in range(3)]
    for plane in stack.planes:
        np.testing.assert_array_equal(read_plane(path, plane), data[plane.t, plane.series, 1])
    np.testing.assert_array_equal(read_plane(path, list_planes(path, channel=0).planes[4].to_dict()), data[1, 1, 0])
    with pytest.raises(StackError, match=r"plate.nd2: data.channel=2 but the stack has 2 channel.*0..1"):
        list_planes(path, channel=2)


def test_nd2_colour_and_z_are_read_like_a_tiff(tmp_path):
    """An RGB ND2 gives (H, W, 3) planes, turned grey by load_frame as a colour TIFF is;
    data.z_plane picks the z of the Z loop; unnamed positions are numbered."""
    pytest.importorskip("nd2")
    from tests.nd2_writer import write_nd2

    rgb = np.random.default_rng(2).integers(0, 65535, (2, 2, 5, 8, 16, 3), dtype=np.uint16)
    path = write_nd2(tmp_path / "rgb.nd2", rgb, "TPZYXS", calibration_um=0.5, position_names=["", ""])
    stack = list_planes(path, z_plane=-1)
    assert stack.axes == "TZYXS" and [(p.position, p.t, p.z) for p in stack.planes] == \
        [(w, t, 2) for w in ("p0", "p1") for t in range(2)]
    np.testing.assert_array_equal(read_plane(path, stack.planes[3]), rgb[1, 1, 2])
    np.testing.assert_array_equal(read_plane(path, list_planes(path, z_plane=4).planes[0]), rgb[0, 0, 4])
    assert load_frame(path, stack.planes[3].to_dict()).shape == (8, 16)
    with pytest.raises(StackError, match="data.z_plane=5 but the stack has 5 z"):
        list_planes(path, z_plane=5)


def test_a_truncated_or_corrupt_nd2_is_rejected_naming_the_file_and_plane(tmp_path):
    pytest.importorskip("nd2")
    path, data = write_nd2_plate(tmp_path / "plate.nd2")
    raw = path.read_bytes()
    stack = list_planes(path)
    first = raw.index(b"ImageDataSeq|0!")
    cut = tmp_path / "cut.nd2"
    cut.write_bytes(raw[: first + 4096 + 1000])  # in the middle of the first frame's pixels
    with pytest.raises(StackError, match=r"cut.nd2: cannot read its ND2 metadata \(ValueError: .*truncated"):
        list_planes(cut)
    cut.write_bytes(raw[: len(raw) - 20])  # in the chunk map at the end
    with pytest.raises(StackError, match="cut.nd2: cannot read its ND2 metadata"):
        list_planes(cut)
    path.write_bytes(raw[: first + 4096 + 1000])  # listed whole, then cut: the plane's read says so
    with pytest.raises(StackError, match=r"plate.nd2 plane t=2 position B2: cannot be read.*truncated"):
        read_plane(path, stack.planes[5])
    # a chunk map that points the last frame past the end of the file: not read as zeros
    entry = raw.rindex(b"ImageDataSeq|5!") + len(b"ImageDataSeq|5!")
    path.write_bytes(raw[:entry] + (len(raw) + 4096).to_bytes(8, "little") + raw[entry + 8:])
    stack = list_planes(path)
    np.testing.assert_array_equal(read_plane(path, stack.planes[0]), data[0, 0, 0])
    with pytest.raises(StackError, match=r"plate.nd2 plane t=2 position B2: frame 5 is missing or cut short"):
        read_plane(path, stack.planes[5])


def test_nd2_without_the_nd2_package_names_the_extra_to_install(tmp_path, monkeypatch):
    from tests.nd2_writer import write_nd2

    path = write_nd2(tmp_path / "plate.nd2", np.ones((2, 8, 8), np.uint16), "TYX")
    monkeypatch.setitem(sys.modules, "nd2", None)  # `import nd2` raises ImportError
    with pytest.raises(StackError, match=r"plate.nd2: reading ND2 needs the nd2 package: pip install 'ipb-ray\[nd2\]'"):
        list_planes(path)
    with pytest.raises(StackError, match=r"ipb-ray\[nd2\]"):
        read_plane(path, {"series": 0, "index": [1, 0], "t": 1, "position": "p0"})
    plan = importers.plan_frames(str(tmp_path), None, load_config(preset="demo").data)
    assert plan.tasks == [] and [r["item"] for r in plan.rejects] == ["file"]
    assert "pip install 'ipb-ray[nd2]'" in plan.rejects[0]["reason"]


def test_plan_frames_makes_a_frame_of_every_nd2_plane_with_its_position_and_pixel_size(tmp_path):
    """The frames importer over a folder holding an ND2 (T=2, positions A1 and B2): one
    shard per plane, rows routed by frame_index and position, the ND2 calibration used."""
    pytest.importorskip("nd2")
    frames = tmp_path / "frames"
    frames.mkdir()
    write_nd2_colonies(frames / "plate.nd2")
    table = tmp_path / "ann.csv"
    table.write_text("frame,x0,y0,x1,y1,label,frame_index,position\n"
                     "plate.nd2,35,35,125,125,Dense,1,B2\n"
                     "plate.nd2,35,35,125,125,Dense,5,B2\n")
    data = load_config(preset="demo", overrides=[f"data.frames={frames}"]).data
    plan = importers.plan_frames(str(frames), str(table), data)
    assert sorted(t.items[0]["source"] for t in plan.tasks) == \
        [f"frames/plate.nd2[{w} t={t}]" for w in ("A1", "B2") for t in range(2)]
    assert "does not hold" in {r["item"]: r["reason"] for r in plan.rejects}[f"{table} row 3"]
    assert any("plate.nd2" in n and "0.65 µm per pixel" in n for n in plan.notes)
    task = next(t for t in plan.tasks if t.items[0]["source"] == "frames/plate.nd2[B2 t=1]")
    assert task.items[0]["columns"] == {"position": "B2", "well": "B2"} and task.items[0]["frame_index"] == 1
    rows, rejects = importers.run_shard(task, data)
    assert len(rows) == 4 and not [r for r in rejects if r["item"] == "frame"]
    assert {r["frame_index"] for r in rows} == {1} and all(r["pixel_size_um"] == pytest.approx(0.65) for r in rows)
    assert sum(r["labels"] == ["Dense"] for r in rows) == 1
    assert {json.loads(r["provenance"])["annotation"]["position"] for r in rows} == {"B2"}

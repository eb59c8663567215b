"""Detector files: each reader on tiny files written here, truncated files, and `deepphase reconstruct` on them.

Files are written with rosettasciio's own writer where it has one (blockfile), with zarr and h5py, and
otherwise in the documented binary layouts (Merlin .mib + .hdr, EMPAD .raw + .xml, Gatan DM4 tags).
"""

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from deepphase.cli import main
from deepphase.data.io import load_scan
from deepphase.data.simulate import required_object_shape, simulate_scan
from deepphase.data.specimens import twisted_hbn
from deepphase.errors import DeepPhaseError
from deepphase.physics import raster_positions, reference_probe

pytest.importorskip("rsciio")
pytest.importorskip("zarr")


# ---------------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------------


def write_mib(path, frames, frames_per_trigger=None, hdr=True, exposure_ns=1_000_000, quad=False):
    """Merlin .mib: per frame an ASCII header (384 bytes; 768 for a quad 2×2 detector, whose header lists the
    DACs of its four chips), then big-endian uint16 pixels stored bottom row first."""
    path = Path(path)
    n, h, w = frames.shape
    chips, assembly, size = ("04", "   2x2", 768) if quad else ("01", "   1x1", 384)
    dacs = ("3RX,175,511,000,000,000,000,000,000,125,255,125,125,100,100,105,100,068,100,220,090,128,111,093,"
            * (4 if quad else 1))
    with open(path, "wb") as f:
        for i, frame in enumerate(frames):
            stamp = f"2024-03-01T10:00:{i * 0.001:012.9f}Z"
            head = (f"MQ1,{i + 1:06d},00{size},{chips},{w:04d},{h:04d},U16,{assembly},01,2024-03-01 10:00:00.000000,"
                    f"{exposure_ns / 1e9:.6f},0,0,0,1.200000E+2,5.110000E+2,0.000000E+0,0.000000E+0,0.000000E+0,"
                    f"0.000000E+0,0.000000E+0,0.000000E+0,{dacs}MQ1A,{stamp},{exposure_ns}ns,12,")
            f.write(head.encode().ljust(size, b"\x00"))
            f.write(np.ascontiguousarray(frame[::-1]).astype(">u2").tobytes())
    if hdr:
        lines = ["HDR,\t", "Time and Date Stamp (day, mnth, yr, hr, min, s):\t01/03/2024 10:00:00",
                 f"Assembly Size (NX1, 2X2):\t{assembly}", "Counter Depth (number):\t12",
                 f"Frames in Acquisition (Number):\t{n}", f"Frames per Trigger (Number):\t{frames_per_trigger or 1}",
                 "End\t"]
        path.with_suffix(".hdr").write_text("\n".join(lines) + "\n")
    return path


def write_empad(folder, frames4d):
    """EMPAD: scan_x{C}_y{R}.raw of little-endian float32 frames of 130 rows × 128 (the last two rows
    metadata), and the .xml that names it (no whitespace between elements: the reader takes text as values)."""
    folder = Path(folder)
    rows, cols = frames4d.shape[:2]
    raw = f"scan_x{cols}_y{rows}.raw"
    full = np.zeros((rows, cols, 130, 128), dtype="<f4")
    full[:, :, :128] = frames4d
    full.tofile(folder / raw)
    (folder / "acquisition.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?><root><timestamp isoformat="2024-03-01T10:00:00.000000"/>'
        f'<raw_file filename="{raw}"/><pix_x>{cols}</pix_x><pix_y>{rows}</pix_y></root>')
    return folder / "acquisition.xml"


def write_dm4(path, data4d, scan_step_nm=None, detector_scale=None, detector_units="", voltage_v=None):
    """A minimal Gatan DM4 file with the tag tree DigitalMicrograph writes for one 4-D uint16 image.

    Version 4, 8-byte size, byte order 1 (little-endian values); tag groups: id 20, name, 8-byte size,
    sorted, open, 8-byte count; data tags: id 21, name, 8-byte size, '%%%%', info-array length and
    entries (8 bytes each, big-endian), value.
    """
    fmt = {3: "<i", 5: "<I", 6: "<f", 7: "<d"}

    def name(text):
        return struct.pack(">h", len(text)) + text.encode()

    def data_tag(tag, info, payload):
        body = b"%%%%" + struct.pack(">q", len(info)) + b"".join(struct.pack(">q", v) for v in info) + payload
        return b"\x15" + name(tag) + struct.pack(">q", len(body)) + body

    def simple(tag, etype, value):
        return data_tag(tag, [etype], struct.pack(fmt[etype], value))

    def text(tag, s):
        return data_tag(tag, [20, 4, len(s)], np.array([ord(c) for c in s], dtype="<u2").tobytes())

    def group(tag, tags):
        body = b"\x00\x01" + struct.pack(">q", len(tags)) + b"".join(tags)
        return b"\x14" + name(tag) + struct.pack(">q", len(body)) + body

    def calibration(scale, units):
        return group("", [simple("Origin", 6, 0.0), simple("Scale", 6, scale), text("Units", units)])

    rows, cols, kr, kc = data4d.shape
    dims = [calibration(detector_scale or 1.0, detector_units if detector_scale else "")] * 2
    dims += [calibration(scan_step_nm or 1.0, "nm" if scan_step_nm else "")] * 2
    image_data = group("ImageData", [
        group("Calibrations", [group("Brightness", [simple("Origin", 6, 0.0), simple("Scale", 6, 1.0),
                                                    text("Units", "")]),
                               group("Dimension", dims)]),
        data_tag("Data", [20, 4, data4d.size], np.ascontiguousarray(data4d, dtype="<u2").tobytes()),
        simple("DataType", 3, 10),  # uint16
        group("Dimensions", [simple("", 5, d) for d in (kc, kr, cols, rows)]),  # fastest axis first
    ])
    tags = [group("Microscope Info", [simple("Voltage", 7, float(voltage_v))])] if voltage_v else []
    image = group("", [image_data, group("ImageTags", tags), text("Name", "4D scan")])
    root = b"\x00\x01" + struct.pack(">q", 1) + group("ImageList", [image])
    Path(path).write_bytes(struct.pack(">i", 4) + struct.pack(">q", len(root)) + struct.pack(">i", 1) + root + bytes(8))
    return Path(path)


def write_blockfile(path, data4d, step_nm=0.2, energy_v=200000):
    from rsciio.blockfile import file_writer

    axes = [dict(size=s, index_in_array=i, name=n, scale=sc, offset=0.0, units=u, navigate=i < 2)
            for i, (s, n, sc, u) in enumerate(zip(data4d.shape, "yx", (step_nm, step_nm), ("nm", "nm")))]
    axes += [dict(size=data4d.shape[i], index_in_array=i, name=f"k{i}", scale=0.01, offset=0.0, units="cm",
                  navigate=False) for i in (2, 3)]
    header = {"Beam_energy": energy_v, "Note": ""}
    file_writer(str(path), {"data": data4d.astype(np.uint8), "axes": axes, "metadata": {},
                            "original_metadata": {"blockfile_header": header}, "attributes": {"_lazy": False}})
    return Path(path)


def write_emd(path, data4d, step_a=0.5, q_step=0.02):
    """EMD 1.0 as py4DSTEM writes it: a group with emd_group_type 1 holding 'data' and dim1..dim4."""
    with h5py.File(path, "w") as f:
        f.attrs["version_major"], f.attrs["version_minor"] = 1, 0
        g = f.create_group("4DSTEM_experiment/data/datacubes/datacube_0")
        g.attrs["emd_group_type"] = 1
        g["data"] = data4d
        for i, (n, step, units, name) in enumerate(zip(data4d.shape, (step_a, step_a, q_step, q_step),
                                                       ("A", "A", "A^-1", "A^-1"), ("R_x", "R_y", "Q_x", "Q_y"))):
            d = g.create_dataset(f"dim{i + 1}", data=np.arange(n) * step)
            d.attrs["name"], d.attrs["units"] = name, units
        f.create_group("4DSTEM_experiment/metadata")
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frames4d():
    rng = np.random.default_rng(5)
    return rng.integers(0, 250, size=(4, 5, 64, 64)).astype(np.uint16)


def read_all(data):
    return np.asarray(data.frames[0 : data.frames.shape[0]])


def test_mib_with_hdr(frames4d, tmp_path):
    path = write_mib(tmp_path / "scan.mib", frames4d.reshape(20, 64, 64), frames_per_trigger=5)
    data = load_scan(path)
    assert data.scan_shape == (4, 5) and data.frames.shape == (20, 64, 64) and data.kind == "counts"
    assert np.array_equal(read_all(data), frames4d.reshape(20, 64, 64))
    assert data.info["format"] == "mib" and data.info["dtype"] == ">u2"
    assert np.array_equal(np.asarray(data.frames[7:9]), frames4d.reshape(20, 64, 64)[7:9])
    # What a notebook shows (was "frames=<deepphase.data.io.RecordFile object at 0x…>": the evaluation audit, s41)
    assert repr(data) == "ScanData(frames (20, 64, 64) >u2, scan_shape=(4, 5), kind='counts', format='mib')"


def test_mib_without_hdr_takes_the_scan_shape(frames4d, tmp_path):
    path = write_mib(tmp_path / "scan.mib", frames4d.reshape(20, 64, 64), hdr=False)
    data = load_scan(path, scan_shape=(4, 5))
    assert data.scan_shape == (4, 5)
    assert np.array_equal(read_all(data), frames4d.reshape(20, 64, 64))
    with pytest.raises(DeepPhaseError, match="scan_shape: 3×5 = 15 positions do not match the 20 frames"):
        load_scan(path, scan_shape=(3, 5))


def test_mib_scan_shape_is_compared_with_its_hdr(frames4d, tmp_path, capsys):
    """A scan shape that differs from the one the .hdr records is refused, not read as a file cut short
    (6×5 of a complete 4×5 acquisition) nor with every frame misplaced (5×4)."""
    path = write_mib(tmp_path / "scan.mib", frames4d.reshape(20, 64, 64), frames_per_trigger=5)
    assert load_scan(path, scan_shape=(4, 5)).scan_shape == (4, 5)
    for wrong in ((6, 5), (5, 4)):
        with pytest.raises(DeepPhaseError, match=rf"scan_shape: {wrong[0]}×{wrong[1]} differs from the 4×5 scan "
                                                 r"that '.*scan.hdr' records; leave scan_shape out"):
            load_scan(path, scan_shape=wrong)
    assert main(["reconstruct", str(path), "--scan-shape", "6", "5", "--step", "1", "--out",
                 str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "error: scan-shape: 6×5 differs from the 4×5 scan" in err and "leave --scan-shape out" in err
    assert not (tmp_path / "out").exists()


def test_quad_mib_512(tmp_path):
    """A Merlin quad (2×2 chips, 512×512 pixels, 768-byte headers) is read like a single chip."""
    rng = np.random.default_rng(6)
    frames = rng.integers(0, 4000, size=(6, 512, 512)).astype(np.uint16)
    path = write_mib(tmp_path / "quad.mib", frames, frames_per_trigger=3, quad=True)
    data = load_scan(path)
    assert data.scan_shape == (2, 3) and data.frames.shape == (6, 512, 512)
    assert np.array_equal(read_all(data), frames)
    assert np.array_equal(np.asarray(data.frames[4:6]), frames[4:6])


def test_empad(tmp_path):
    rng = np.random.default_rng(2)
    frames = rng.normal(10, 3, size=(4, 5, 128, 128)).astype(np.float32)
    data = load_scan(write_empad(tmp_path, frames))
    assert data.scan_shape == (4, 5) and data.info["format"] == "empad" and data.info["dtype"] == "float32"
    assert np.array_equal(read_all(data), frames.reshape(20, 128, 128))


def test_dm4_with_calibrations(frames4d, tmp_path):
    path = write_dm4(tmp_path / "scan.dm4", frames4d, scan_step_nm=0.05, detector_scale=0.2, detector_units="1/nm",
                     voltage_v=300e3)
    data = load_scan(path)
    assert data.scan_shape == (4, 5) and np.array_equal(read_all(data), frames4d.reshape(20, 64, 64))
    assert data.info["scan_step_angstrom"] == pytest.approx(0.5)
    assert data.info["detector_sampling"]["units"] == "1/nm"
    assert data.info["detector_sampling"]["value"] == pytest.approx(0.2)
    assert data.info["energy_kev"] == pytest.approx(300)


def test_blockfile_written_by_rosettasciio(frames4d, tmp_path):
    data = load_scan(write_blockfile(tmp_path / "scan.blo", frames4d))
    assert data.scan_shape == (4, 5) and data.info["format"] == "blockfile"
    assert np.array_equal(read_all(data), frames4d.reshape(20, 64, 64).astype(np.uint8))
    assert data.info["scan_step_angstrom"] == pytest.approx(2.0) and data.info["energy_kev"] == pytest.approx(200)


def test_zarr_group_and_array(frames4d, tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "scan.zarr"), mode="w")
    array = group.create_array("experiment/data", shape=frames4d.shape, dtype=frames4d.dtype, chunks=(1, 5, 64, 64))
    array[:] = frames4d
    data = load_scan(tmp_path / "scan.zarr")
    assert data.scan_shape == (4, 5) and data.info["dataset"] == "experiment/data"
    assert np.array_equal(read_all(data), frames4d.reshape(20, 64, 64))
    assert np.array_equal(np.asarray(data.frames[3:12]), frames4d.reshape(20, 64, 64)[3:12])  # across scan rows
    flat = zarr.open_array(str(tmp_path / "flat.zarr"), mode="w", shape=(20, 64, 64), dtype="f4")
    flat[:] = frames4d.reshape(20, 64, 64)
    data = load_scan(tmp_path / "flat.zarr")
    assert data.scan_shape is None and np.array_equal(read_all(data), frames4d.reshape(20, 64, 64))


def test_a_zarr_store_rewritten_or_missing_a_chunk_is_seen_to_have_changed(frames4d, tmp_path):
    """Only the store's folder was compared (its size and time stay when a chunk file is rewritten or removed): an
    image 0.165 rad off was written from a store changed mid-run, and a resume would take one changed between the
    interruption and it (the scale audit, s41)."""
    import os
    import shutil

    import zarr

    from deepphase.reconstruction.from_file import _file_state

    store = tmp_path / "flat.zarr"
    flat = zarr.open_array(str(store), mode="w", shape=(20, 64, 64), dtype="f4", chunks=(5, 64, 64))
    flat[:] = frames4d.reshape(20, 64, 64)
    first = _file_state(store)
    folder_time = os.stat(store).st_mtime_ns
    chunk = max((p for p in store.rglob("*") if p.is_file() and p.name != "zarr.json"), key=lambda p: str(p))
    stamp = os.stat(chunk).st_mtime_ns
    flat[15:20] = 1.0  # a chunk rewritten (not zeros: zarr removes an empty chunk's file)
    os.utime(chunk, ns=(stamp + 10**9, stamp + 10**9))  # (a second later, whatever the clock's resolution)
    assert os.stat(store).st_mtime_ns == folder_time and _file_state(store) != first
    second = _file_state(store)
    shutil.move(str(chunk), str(tmp_path / "away"))  # a chunk missing (read as zeros by zarr)
    assert _file_state(store) != second


def test_emd_1_0_from_py4dstem(frames4d, tmp_path):
    data = load_scan(write_emd(tmp_path / "scan.emd", frames4d))
    try:
        assert data.scan_shape == (4, 5) and data.info["format"] == "emd"
        assert data.info["group"] == "4DSTEM_experiment/data/datacubes/datacube_0"
        assert np.array_equal(read_all(data), frames4d.reshape(20, 64, 64))
        assert data.info["scan_step_angstrom"] == pytest.approx(0.5)
        assert data.info["detector_sampling"] == {"value": pytest.approx(0.02), "units": "A^-1"}
    finally:
        data.close()


def test_emd_1_0_from_emdfile_numbers_its_dimensions_from_0(frames4d, tmp_path):
    """py4DSTEM from 0.14 writes through emdfile, whose dimension vectors are dim0..dim3: the scan steps are dim0's
    and dim1's, the detector's sampling dim3's (read from dim1..dim4 they were shifted by one axis)."""
    emdfile = pytest.importorskip("emdfile")
    steps, units = (0.5, 0.6, 0.02, 0.03), ("A", "A", "A^-1", "A^-1")
    cube = emdfile.Array(data=frames4d, name="datacube", dims=[np.arange(n) * d for n, d in zip(frames4d.shape, steps)],
                         dim_units=list(units), dim_names=["Rx", "Ry", "Qx", "Qy"])
    root = emdfile.Root(name="experiment")
    root.tree(cube)
    emdfile.save(str(tmp_path / "cube.h5"), root, mode="o")
    data = load_scan(tmp_path / "cube.h5")
    try:
        assert data.scan_shape == (4, 5) and np.array_equal(read_all(data), frames4d.reshape(20, 64, 64))
        assert data.info["scan_step_angstrom"] == pytest.approx([0.5, 0.6])
        assert data.info["detector_sampling"] == {"value": pytest.approx(0.03), "units": "A^-1"}
    finally:
        data.close()


def test_emd_written_by_hyperspy_is_read_with_its_detector_axes_last(frames4d, tmp_path):
    """rosettasciio's EMD writer (HyperSpy's ``s.save("x.emd")``) stores a (4, 5, 64, 64) scan as (64, 64, 5, 4),
    dim1..dim4 = kx, ky, x, y: read as py4DSTEM's C order it was a 64×64 scan of 5×4 "patterns"."""
    from rsciio.emd import file_writer

    data4d = frames4d[:, :, :, :48]  # (a non-square detector: the axes cannot be swapped back by accident)
    axes = [dict(size=s, index_in_array=i, name=n, scale=sc, offset=0.0, units=u, navigate=i < 2)
            for i, (s, n, sc, u) in enumerate(zip(data4d.shape, ("y", "x", "ky", "kx"), (0.05, 0.05, 1.6, 1.6),
                                                  ("nm", "nm", "mrad", "mrad")))]
    metadata = {"General": {"title": "scan"}, "Signal": {"signal_type": "electron_diffraction"}}
    file_writer(str(tmp_path / "scan.emd"), {"data": data4d, "axes": axes, "metadata": metadata,
                                             "original_metadata": {}, "attributes": {"_lazy": False}})
    with h5py.File(tmp_path / "scan.emd") as f:  # (the layout this test is about)
        assert f["signals/scan/data"].shape == (48, 64, 5, 4)
    data = load_scan(tmp_path / "scan.emd")
    try:
        assert data.scan_shape == (4, 5) and data.frames.shape == (20, 64, 48)
        assert np.array_equal(read_all(data), data4d.reshape(20, 64, 48))
        assert np.array_equal(np.asarray(data.frames[3:12]), data4d.reshape(20, 64, 48)[3:12])  # across scan rows
        assert data.info["scan_step_angstrom"] == pytest.approx(0.5)
        assert data.info["detector_sampling"]["value"] == pytest.approx(1.6)
    finally:
        data.close()
    from deepphase.data.calibration import detector_mrad_per_px

    assert detector_mrad_per_px(1.6, "[m_r_a_d]", None) == pytest.approx(1.6)  # (as py4DSTEM and rsciio write it)


@pytest.mark.parametrize("stack", [False, True])
def test_emd_written_by_hyperspy_without_calibrated_axes_is_read_the_right_way_round(stack, frames4d, tmp_path):
    """Only units that said "detector first" reversed rosettasciio's EMD; a scan with uncalibrated axes (units "[]")
    was read as stored: a square scan on its own detector's size gave an image correlating −0.03 with the right one,
    written with exit status 0, and a stack of frames (k, k, N) was "64 patterns of 64×20" (the formats audit,
    s41). The layout says it, as rosettasciio reads it: every group but py4DSTEM's is stored reversed."""
    from rsciio.emd import file_writer

    data = frames4d.reshape(20, 64, 64)[:, :, :48] if stack else frames4d[:, :, :, :48]
    names = ("frame", "ky", "kx") if stack else ("y", "x", "ky", "kx")
    axes = [dict(size=n, index_in_array=i, name=name, scale=1.0, offset=0.0, units="", navigate=i < data.ndim - 2)
            for i, (n, name) in enumerate(zip(data.shape, names))]
    file_writer(str(tmp_path / "scan.emd"), {"data": data, "axes": axes, "original_metadata": {},
                                             "metadata": {"General": {"title": "scan"}, "Signal": {}},
                                             "attributes": {"_lazy": False}})
    with h5py.File(tmp_path / "scan.emd") as f:  # (stored reversed, its units empty)
        assert f["signals/scan/data"].shape == data.shape[::-1]
        assert {f[f"signals/scan/dim{i}"].attrs["units"] for i in range(1, data.ndim + 1)} == {"[]"}
    loaded = load_scan(tmp_path / "scan.emd")
    try:
        assert loaded.scan_shape == (None if stack else (4, 5)) and loaded.frames.shape == (20, 64, 48)
        assert np.array_equal(read_all(loaded), data.reshape(20, 64, 48))
        assert np.array_equal(np.asarray(loaded.frames[3:12]), data.reshape(20, 64, 48)[3:12])
        assert "detector_sampling" not in loaded.info  # ("[]" is no unit)
    finally:
        loaded.close()


def test_an_emd_group_stored_scan_first_with_detector_units_is_read_as_stored(frames4d, tmp_path):
    """Not py4DSTEM's, so stored reversed by the layout rule, but its detector axes in mrad say they come last: read
    as stored (backwards before: the review, s41)."""
    data = frames4d[:, :, :, :48]
    with h5py.File(tmp_path / "scan.emd", "w") as f:
        f.attrs["version_major"], f.attrs["version_minor"] = 0, 2
        g = f.create_group("data/scan")
        g.attrs["emd_group_type"] = 1
        g["data"] = data
        for i, (n, units) in enumerate(zip(data.shape, ("pixel", "pixel", "mrad", "mrad"))):
            d = g.create_dataset(f"dim{i + 1}", data=np.arange(n) * 1.0)
            d.attrs["name"], d.attrs["units"] = f"axis {i}", units
    loaded = load_scan(tmp_path / "scan.emd")
    try:
        assert loaded.scan_shape == (4, 5) and loaded.frames.shape == (20, 64, 48)
        assert np.array_equal(read_all(loaded), data.reshape(20, 64, 48))
    finally:
        loaded.close()


def test_hyperspy_hspy_is_read_with_its_calibration_and_beam_energy(frames4d, tmp_path):
    from rsciio.hspy import file_writer

    axes = [dict(size=s, index_in_array=i, name=n, scale=sc, offset=0.0, units=u, navigate=i < 2)
            for i, (s, n, sc, u) in enumerate(zip(frames4d.shape, ("y", "x", "ky", "kx"), (0.05, 0.05, 1.6, 1.6),
                                                  ("nm", "nm", "mrad", "mrad")))]
    metadata = {"General": {"title": "scan"}, "Signal": {"signal_type": "electron_diffraction"},
                "Acquisition_instrument": {"TEM": {"beam_energy": 200.0}}}
    file_writer(str(tmp_path / "scan.hspy"), {"data": frames4d, "axes": axes, "metadata": metadata,
                                              "original_metadata": {}, "tmp_parameters": {}, "models": {},
                                              "learning_results": {}, "attributes": {"_lazy": False},
                                              "package_info": {"name": "hyperspy", "version": "2.3.0"}})
    data = load_scan(tmp_path / "scan.hspy")
    try:
        assert data.scan_shape == (4, 5) and np.array_equal(read_all(data), frames4d.reshape(20, 64, 64))
        assert data.info["scan_step_angstrom"] == pytest.approx(0.5) and data.info["energy_kev"] == pytest.approx(200)
        assert data.info["detector_sampling"] == {"value": pytest.approx(1.6), "units": "mrad"}
    finally:
        data.close()


def test_a_file_named_as_another_format_is_named_for_what_it_is(frames4d, tmp_path):
    from deepphase.errors import InputFileError

    np.save(tmp_path / "one.npy", frames4d)
    np.savez(tmp_path / "two.npz", amplitude=frames4d)
    for source, name, expected in (("one.npy", "one.npz", "is an .npy file (one array), not an .npz archive"),
                                   ("one.npy", "one.h5", "is an .npy file, not HDF5"),
                                   ("two.npz", "two.npy", "is an .npz archive (several arrays), not an .npy file")):
        (tmp_path / name).write_bytes((tmp_path / source).read_bytes())
        with pytest.raises(InputFileError, match=re.escape(expected)):
            load_scan(tmp_path / name)


def test_a_fortran_order_npy_stays_memory_mapped(frames4d, tmp_path):
    np.save(tmp_path / "f.npy", np.asfortranarray(frames4d))
    data = load_scan(tmp_path / "f.npy")
    assert not isinstance(data.frames, np.ndarray)  # (a reshape of the memory map would copy the whole file)
    assert np.array_equal(np.asarray(data.frames[3:12]), frames4d.reshape(20, 64, 64)[3:12])
    assert np.array_equal(read_all(data), frames4d.reshape(20, 64, 64))


def test_a_4d_npy_is_read_frame_by_frame(frames4d, tmp_path):
    """Read through the scan-row view, one frame cost a whole scan row (calibration's 2,048 spread frames: the whole
    file, many times over), and integer indices and slices with a step were refused or wrong (review, s38)."""
    np.save(tmp_path / "s.npy", frames4d)
    flat = frames4d.reshape(20, 64, 64)
    with load_scan(tmp_path / "s.npy") as data:
        frames = data.frames
        assert data.scan_shape == (4, 5) and frames.shape == (20, 64, 64)
        assert np.array_equal(frames[7], flat[7]) and np.array_equal(frames[-1], flat[-1])
        assert np.array_equal(frames[3:12:4], flat[3:12:4]) and np.array_equal(frames[18:40], flat[18:])
    with pytest.raises(ValueError, match="closed"):
        frames[0:1]  # (closed with the scan)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["data"] = np.asfortranarray(frames4d)
    with load_scan(tmp_path / "s.h5") as data, pytest.raises(TypeError, match="consecutive"):
        data.frames[0:4:2]  # (was: the step ignored, 4 frames returned)


def test_missing_reader_package_names_the_extra(frames4d, tmp_path, monkeypatch):
    path = write_mib(tmp_path / "scan.mib", frames4d.reshape(20, 64, 64), frames_per_trigger=5)
    monkeypatch.setitem(sys.modules, "rsciio", None)  # import rsciio now raises ImportError
    with pytest.raises(DeepPhaseError, match=r"pip install -e \"\.\[files\]\" \(in deepphase's source folder\)"):
        load_scan(path)


# ---------------------------------------------------------------------------------------------------------------
# Truncated files: raw detector formats keep their complete scan rows, others are refused
# ---------------------------------------------------------------------------------------------------------------


def truncate(path, nbytes):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) - nbytes])


def test_truncated_raw_detector_files_keep_complete_rows(frames4d, tmp_path):
    flat = frames4d.reshape(20, 64, 64)
    mib = write_mib(tmp_path / "scan.mib", flat, frames_per_trigger=5)
    truncate(mib, 3 * (384 + 64 * 64 * 2) + 100)  # 16 whole frames and part of the 17th
    data = load_scan(mib)
    assert data.scan_shape == (3, 5) and data.info["truncated"]["frames_in_file"] == 16
    assert np.array_equal(read_all(data), flat[:15])
    data = load_scan(mib, scan_shape=(4, 5))
    assert data.scan_shape == (3, 5) and data.info["truncated"]["rows_kept"] == 3

    empad = write_empad(tmp_path, np.ones((4, 5, 128, 128), np.float32))
    truncate(tmp_path / "scan_x5_y4.raw", 128 * 130 * 4 * 6)
    data = load_scan(empad)
    assert data.scan_shape == (2, 5) and data.info["truncated"]["frames_in_file"] == 14

    blo = write_blockfile(tmp_path / "scan.blo", frames4d)
    truncate(blo, 2 * (6 + 64 * 64))
    data = load_scan(blo)
    assert data.scan_shape == (3, 5) and np.array_equal(read_all(data), flat[:15].astype(np.uint8))


CUT_SHORT_WHILE_READ = """
import sys
from pathlib import Path
from deepphase.data.io import load_scan
from deepphase.errors import InputFileError
scan, data_file = load_scan(sys.argv[1]), Path(sys.argv[2])
with open(data_file, "r+b") as f:
    f.truncate(data_file.stat().st_size // 2)
try:
    scan.frames[len(scan.frames) - 2 : len(scan.frames)]
except InputFileError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("fmt", ["npy-frames", "npy-4d", "npy-fortran", "empad", "blo", "mib", "dm4"])
def test_a_file_cut_short_while_it_is_read_is_an_error_not_a_crash(fmt, frames4d, tmp_path):
    """A file cut short after it was opened (a copy still running, a full disk): the reading names it. A memory map
    would die of SIGBUS instead (the failure audit, s36), taking the process and every unsaved result with it."""
    said = "ended at byte"  # (read by file reads)
    if fmt.startswith("npy"):
        path = data_file = tmp_path / "scan.npy"
        np.save(path, {"npy-frames": frames4d.reshape(20, 64, 64), "npy-4d": frames4d,
                       "npy-fortran": np.asfortranarray(frames4d)}[fmt])
        said = "bytes, " if fmt == "npy-fortran" else said  # (still a memory map, guarded by the file's size)
    elif fmt == "empad":
        path, data_file = write_empad(tmp_path, np.ones((4, 5, 128, 128), np.float32)), tmp_path / "scan_x5_y4.raw"
    elif fmt == "mib":
        path = data_file = write_mib(tmp_path / "scan.mib", frames4d.reshape(20, 64, 64), frames_per_trigger=5)
    elif fmt == "dm4":
        path = data_file = write_dm4(tmp_path / "scan.dm4", frames4d)
        said = "bytes, "
    else:
        path = data_file = write_blockfile(tmp_path / "scan.blo", frames4d)
    result = subprocess.run([sys.executable, "-c", CUT_SHORT_WHILE_READ, str(path), str(data_file)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]  # (-7: SIGBUS)
    assert f"refused: data: {str(data_file)!r}" in result.stdout and said in result.stdout, result.stdout
    assert "cut short" in result.stdout


def test_truncated_files_of_other_formats_are_refused(frames4d, tmp_path):
    np.save(tmp_path / "scan.npy", frames4d)
    truncate(tmp_path / "scan.npy", 1000)
    with pytest.raises(DeepPhaseError, match="truncated"):
        load_scan(tmp_path / "scan.npy")
    dm4 = write_dm4(tmp_path / "scan.dm4", frames4d)
    truncate(dm4, 3000)
    with pytest.raises(DeepPhaseError, match="could not read"):
        load_scan(dm4)
    emd = write_emd(tmp_path / "scan.emd", frames4d)
    truncate(emd, 20000)
    with pytest.raises(DeepPhaseError, match="could not"):
        data = load_scan(emd)
        read_all(data)


# ---------------------------------------------------------------------------------------------------------------
# `deepphase reconstruct` on detector files
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector_scan():
    """A 10×10 scan of twisted hBN as a 64×64 detector records it: 2.1× finer angular sampling than the
    model, the disk off centre and drifting, one hot pixel, Poisson counts at the model's dose."""
    probe = reference_probe()
    positions = raster_positions((10, 10), 0.87, fastest="col")  # frame [i, j] of a 4-D file is at (i, j)·step
    truth = twisted_hbn(required_object_shape(positions, 32))
    intensity = simulate_scan(truth, probe, positions, noise=False, progress=False).amplitude.astype(np.float64) ** 2
    rng = np.random.default_rng(3)
    zoom, size = 2.1, 64
    drift = np.array([29.2, 35.6])[None] + positions @ np.array([[0.1, 0.05], [0.0, -0.15]]).T
    rows, cols = np.indices((size, size), dtype=np.float64)
    out = np.empty((len(positions), size, size), dtype=np.uint16)
    for i, pattern in enumerate(intensity):
        fine = ndimage.map_coordinates(pattern, [16 + (rows - drift[i, 0]) / zoom, 16 + (cols - drift[i, 1]) / zoom],
                                       order=3, mode="constant").clip(0)
        out[i] = rng.poisson(fine * pattern.sum() / fine.sum())
    out[:, 5, 50] = 2000
    return out.reshape(10, 10, size, size), truth


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def correlation_with(truth, out):
    meta = json.loads((out / "metadata.json").read_text())
    phase = np.load(out / "phase.npy")
    r0, c0 = meta["origin_px"]
    crop = truth[r0 : r0 + phase.shape[0], c0 : c0 + phase.shape[1]]
    return np.corrcoef(phase.ravel(), crop.ravel())[0, 1], meta


@pytest.mark.parametrize("fmt", ["mib", "dm4", "emd", "blo", "zarr", "npy", "empad"])
def test_reconstruct_calibrates_detector_files(fmt, detector_scan, tmp_path, capsys):
    data4d, truth = detector_scan
    size = 64
    if fmt == "mib":
        path = write_mib(tmp_path / "scan.mib", data4d.reshape(-1, 64, 64), frames_per_trigger=10)
    elif fmt == "dm4":
        path = write_dm4(tmp_path / "scan.dm4", data4d)
    elif fmt == "emd":
        path = write_emd(tmp_path / "scan.emd", data4d)
    elif fmt == "blo":  # 8-bit: the hot pixel saturates at 255, the counts (< 255) are kept
        path = write_blockfile(tmp_path / "scan.blo", np.minimum(data4d, 255))
    elif fmt == "zarr":
        import zarr

        path = tmp_path / "scan.zarr"
        array = zarr.open_array(str(path), mode="w", shape=data4d.shape, dtype=data4d.dtype, chunks=(2, 10, 64, 64))
        array[:] = data4d
    elif fmt == "npy":
        path = tmp_path / "scan.npy"
        np.save(path, data4d)
    else:  # EMPAD is 128×128 float32: each pixel split in four quarters of its counts
        size = 128
        path = write_empad(tmp_path, np.repeat(np.repeat(data4d.astype(np.float32) / 4, 2, axis=2), 2, axis=3))
    code, out, err = run(["reconstruct", path, "--step", 0.87, "--out", tmp_path / "rec"], capsys)
    assert code == 0, err
    assert f"calibrated {size}×{size} → 32×32" in out
    corr, meta = correlation_with(truth, tmp_path / "rec")
    print(f"{fmt}: correlation {corr:.3f}")
    assert corr > 0.8
    cal = meta["calibration"]
    assert cal["zoom"] == pytest.approx(64 / size / 2.1, rel=0.02)
    hot = [[5, 50]] if size == 64 else [[10, 100], [10, 101], [11, 100], [11, 101]]
    assert cal["masked_pixels"]["count"] == len(hot) and cal["masked_pixels"]["first"] == hot
    assert cal["descan"]["applied"] and len(cal["descan"]["coefficients"]) == 2
    assert meta["data_info"]["scan_shape"] == [10, 10]
    assert (tmp_path / "rec" / "calibration.png").stat().st_size > 10_000


def test_reconstruct_calibrates_a_quad_mib_512(detector_scan, tmp_path, capsys):
    """The same scan on a 512×512 Merlin quad: every 64×64 pixel split into 8×8, each holding the
    pixel's count in detector units of 1/64 electron (--gain 64); the hot pixel is one pixel of the quad."""
    data4d, truth = detector_scan
    coarse = data4d.reshape(-1, 64, 64).copy()
    coarse[:, 5, 50] = coarse[:, 5, 49]
    fine = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    fine[:, 43, 403] = 60000
    path = write_mib(tmp_path / "quad.mib", fine, frames_per_trigger=10, quad=True)
    code, out, err = run(["reconstruct", path, "--step", 0.87, "--gain", 64, "--out", tmp_path / "rec"], capsys)
    assert code == 0, err
    assert "calibrated 512×512 → 32×32" in out
    corr, meta = correlation_with(truth, tmp_path / "rec")
    print(f"quad: correlation {corr:.3f}")
    assert corr > 0.8
    assert meta["calibration"]["zoom"] == pytest.approx(1 / (2.1 * 8), rel=0.02)
    assert meta["calibration"]["masked_pixels"]["first"] == [[43, 403]]


def test_reconstruct_of_a_truncated_mib_keeps_the_complete_rows(detector_scan, tmp_path, capsys):
    data4d, _ = detector_scan
    path = write_mib(tmp_path / "scan.mib", data4d.reshape(-1, 64, 64), frames_per_trigger=10)
    truncate(path, 13 * (384 + 64 * 64 * 2))
    code, out, err = run(["reconstruct", path, "--step", 0.87, "--out", tmp_path / "rec"], capsys)
    assert code == 0, err
    assert "truncated" in err and "8 complete scan rows" in err
    meta = json.loads((tmp_path / "rec" / "metadata.json").read_text())
    assert meta["n_patterns"] == 80 and meta["data_info"]["truncated"]["frames_in_file"] == 87


def test_no_calibration_refuses_detector_patterns(detector_scan, tmp_path, capsys):
    np.save(tmp_path / "scan.npy", detector_scan[0])
    code, out, err = run(["reconstruct", tmp_path / "scan.npy", "--step", 0.87, "--no-calibration",
                          "--out", tmp_path / "rec"], capsys)
    assert code == 2 and "64×64" in err and len(err.strip().splitlines()) == 1


def bad_detector_data(data4d, tmp_path):
    cases = {}
    nan = data4d.astype(np.float32)
    nan[2, 3, :20] = np.nan
    cases["NaN"] = (nan, "frame 23 has")
    cases["negative offset"] = (data4d.astype(np.float32) - 30, "negative counts")
    zero = data4d.copy()
    zero[:4] = 0
    cases["all-zero patterns"] = (zero, "patterns read are zero everywhere")
    rng = np.random.default_rng(0)
    cases["no disk"] = (rng.poisson(5.0, size=data4d.shape).astype(np.uint16), "no bright-field disk")
    cases["disk off the detector"] = (np.roll(data4d, 25, axis=-1), "detector edge")
    out = {}
    for name, (array, expected) in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
        out[name] = ([tmp_path / f"{name}.npy", "--step", 0.87], expected)
    np.save(tmp_path / "flat.npy", data4d.reshape(-1, 64, 64))
    out["scan shape does not divide the frames"] = ([tmp_path / "flat.npy", "--scan-shape", 7, 13, "--step", 0.87],
                                                    "do not match the 100")
    np.save(tmp_path / "short.npy", data4d)
    truncate(tmp_path / "short.npy", 5000)
    out["truncated .npy"] = ([tmp_path / "short.npy", "--step", 0.87], "truncated")
    out["bad gain"] = ([tmp_path / "flat.npy", "--scan-shape", 10, 10, "--step", 0.87, "--gain", -1], "gain")
    return out


@pytest.mark.parametrize("case", ["NaN", "negative offset", "all-zero patterns", "no disk", "disk off the detector",
                                  "scan shape does not divide the frames", "truncated .npy", "bad gain"])
def test_bad_detector_data_gives_one_clear_line(case, detector_scan, tmp_path, capsys):
    args, expected = bad_detector_data(detector_scan[0], tmp_path)[case]
    code, out, err = run(["reconstruct", *args, "--out", tmp_path / "out"], capsys)
    assert code == 2, err
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_repairs_are_reported(detector_scan, tmp_path, capsys):
    data = detector_scan[0].astype(np.float32)
    data[1, 1] = 0  # a dropped frame
    data[4, 4, 30, 31] = np.inf  # one bad value
    np.save(tmp_path / "scan.npy", data)
    code, out, err = run(["reconstruct", tmp_path / "scan.npy", "--step", 0.87, "--gain", 2,
                          "--out", tmp_path / "rec"], capsys)
    assert code == 0, err
    assert "1 zero patterns replaced" in err and "1 nonfinite values replaced" in err
    meta = json.loads((tmp_path / "rec" / "metadata.json").read_text())
    assert meta["calibration"]["repairs"]["zero_patterns_replaced"] == 1
    assert meta["calibration"]["gain_units_per_electron"] == 2


def test_scan_step_from_the_file_with_energy_and_semi_angle(detector_scan, tmp_path, capsys):
    """With the beam energy and the convergence semi-angle, the calibrated real-space pixel size turns the
    file's scan step (Å) into the step in pixels that the positions need."""
    from deepphase.data.calibration import model_disk
    from deepphase.physics import electron_wavelength

    data4d, truth = detector_scan
    energy, semi_angle = 300.0, 25.0
    pixel = electron_wavelength(energy) / (32 * semi_angle / model_disk(reference_probe())["radius"] * 1e-3)
    path = write_dm4(tmp_path / "scan.dm4", data4d, scan_step_nm=0.87 * pixel / 10, voltage_v=energy * 1e3)
    code, out, err = run(["reconstruct", path, "--semi-angle", semi_angle, "--out", tmp_path / "rec"], capsys)
    assert code == 0, err
    corr, meta = correlation_with(truth, tmp_path / "rec")
    assert meta["step_px"] == pytest.approx(0.87, rel=0.01) and "step_from" in meta
    assert meta["pixel_size_angstrom"] == pytest.approx(pixel, rel=0.01)
    assert corr > 0.8
    code, out, err = run(["reconstruct", write_dm4(tmp_path / "nostep.dm4", data4d), "--out", tmp_path / "r2"], capsys)
    assert code == 2 and "--step S is enough" in err


def test_amplitudes_are_told_from_gain_corrected_counts(rng):
    """Roots of whole counts are amplitudes; gain-corrected counts (floats) and counts carrying float32's rounding
    are not: any float above ~30 was taken for a root (a tolerance of 1e-3 of its square, the calibration audit,
    s39), and a calibrated file of such counts was reconstructed from their squares."""
    from deepphase.data.io import looks_like_amplitudes

    counts = rng.poisson(rng.uniform(0, 300, (16, 32, 32)))
    assert looks_like_amplitudes(np.sqrt(counts)) and looks_like_amplitudes(np.sqrt(counts).astype(np.float32))
    assert not looks_like_amplitudes(counts) and not looks_like_amplitudes(counts.astype(np.float32))
    assert not looks_like_amplitudes(rng.uniform(100, 200, (16, 32, 32)))  # (counts / a gain)
    assert not looks_like_amplitudes(np.sqrt(counts).astype(np.float32) ** 2)  # (counts with float32's rounding)


def test_a_dark_level_left_in_the_patterns_is_noted(detector_scan, tmp_path, capsys):
    """An integrating detector's dark level not subtracted went into every pattern without a word (the calibration
    audit, s39: 7 % of the disk's level cost 0.993 → 0.919 in correlation); the scan without it gets no such note."""
    data4d, _ = detector_scan
    said = "a detector's dark level not subtracted?"
    for name, data, noted in (("plain", data4d, False), ("offset", data4d + 3, True)):
        np.save(tmp_path / f"{name}.npy", data)
        code, _, err = run(["reconstruct", tmp_path / f"{name}.npy", "--step", 0.87, "--no-probe-check",
                            "--out", tmp_path / name], capsys)
        assert code == 0 and (said in err) == noted, err

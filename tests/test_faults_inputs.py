"""Damaged raw files through `dipro prepare`: one line naming the file (and line), exit 2, nothing written.

The raw trees are written by tests/prepare_raw.py in the real PhysioNet layout; each test
damages one file the way a broken download or a bad export does.
"""
from __future__ import annotations

import gzip
import shutil
import zipfile
from pathlib import Path

import pytest

from data_sharding.prepare import PrepareOptions, prepare
from data_sharding.readers import resolve_roots
from dipro import cli

try:
    from tests.prepare_raw import RawTree, at
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from prepare_raw import RawTree, at


def raw_tree(root: Path, n: int = 10) -> Path:
    t = RawTree()
    for i in range(n):
        s = 13000001 + i
        t.icu_patient(s)
        hadm, stay = s * 10 + 1, s * 100 + 1
        for h in range(0, 60, 3):
            t.chartevent(s, hadm, stay, 220045, at(h + 0.5), str(80 + h % 9), 80 + h % 9, "bpm")
    return t.write(root)


def run_prepare(capsys, raw: Path, out: Path) -> tuple[int, str]:
    rc = cli.main(["prepare", "--raw", str(raw), "--out", str(out), "--no-progress"])
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def gunzip_rows(path: Path) -> list[bytes]:
    return gzip.decompress(path.read_bytes()).split(b"\n")


def regzip(path: Path, rows: list[bytes]) -> None:
    path.write_bytes(gzip.compress(b"\n".join(rows), mtime=0))


def test_truncated_gzip_dimension_table(tmp_path, capsys):
    """The issue's case: icustays.csv.gz cut in the middle of its compressed stream."""
    raw = raw_tree(tmp_path / "raw")
    icu = raw / "mimiciv/2.0/icu/icustays.csv.gz"
    # enough rows that the header decompresses but the stream ends early
    rows = gunzip_rows(icu)
    regzip(icu, rows[:-1] + rows[1:-1] * 200 + [b""])
    data = icu.read_bytes()
    icu.write_bytes(data[: len(data) * 2 // 3])
    rc, err = run_prepare(capsys, raw, tmp_path / "out")
    line = one_line(err)
    assert rc == 2
    assert line.startswith(f"dipro prepare: error: {icu}: cannot decompress"), line
    assert "truncated or corrupt" in line
    assert not (tmp_path / "out").exists()


def test_truncated_gzip_streamed_event_table(tmp_path, capsys):
    raw = raw_tree(tmp_path / "raw")
    chart = raw / "mimiciv/2.0/icu/chartevents.csv.gz"
    rows = gunzip_rows(chart)
    regzip(chart, rows[:-1] + rows[1:-1] * 300 + [b""])
    data = chart.read_bytes()
    chart.write_bytes(data[: len(data) // 2])
    rc, err = run_prepare(capsys, raw, tmp_path / "out")
    line = one_line(err)
    assert rc == 2 and f"{chart}: cannot decompress" in line, line


def test_non_utf8_bytes_name_the_line(tmp_path, capsys):
    raw = raw_tree(tmp_path / "raw")
    adm = raw / "mimiciv/2.0/hosp/admissions.csv.gz"
    rows = gunzip_rows(adm)
    rows[4] = rows[4].replace(b"ENGLISH", b"ENGL\xff\xfeSH")  # line 5 of the file (header = line 1)
    regzip(adm, rows)
    rc, err = run_prepare(capsys, raw, tmp_path / "out")
    line = one_line(err)
    assert rc == 2
    assert f"{adm} line 5: not UTF-8 text" in line, line


def test_non_utf8_bytes_in_a_streamed_table_name_the_line(tmp_path, capsys):
    raw = raw_tree(tmp_path / "raw")
    chart = raw / "mimiciv/2.0/icu/chartevents.csv.gz"
    rows = gunzip_rows(chart)
    assert b",bpm," in rows[7]
    rows[7] = rows[7].replace(b",bpm,", b",b\xe9m,")  # Latin-1, not UTF-8, in the valueuom column
    regzip(chart, rows)
    rc, err = run_prepare(capsys, raw, tmp_path / "out")
    line = one_line(err)
    assert rc == 2 and f"{chart} line 8: not UTF-8 text" in line, line


def test_malformed_csv_row_names_the_line(tmp_path, capsys):
    raw = raw_tree(tmp_path / "raw")
    chart = raw / "mimiciv/2.0/icu/chartevents.csv.gz"
    rows = gunzip_rows(chart)
    rows[12] = rows[12] + b",extra,fields"  # line 13: two columns too many
    regzip(chart, rows)
    rc, err = run_prepare(capsys, raw, tmp_path / "out")
    line = one_line(err)
    assert rc == 2
    assert f"{chart} line 13: cannot parse" in line and "Expected 10 columns, got 12" in line, line


def test_malformed_row_in_a_plain_csv_dimension_table(tmp_path, capsys):
    t = RawTree()
    for i in range(6):
        t.icu_patient(14000001 + i)
    raw = t.write(tmp_path / "raw", gz=False)
    pat = raw / "mimiciv/2.0/hosp/patients.csv"
    lines = pat.read_bytes().split(b"\n")
    lines[3] = lines[3].rsplit(b",", 2)[0]  # line 4 lost its last two fields
    pat.write_bytes(b"\n".join(lines))
    rc, err = run_prepare(capsys, raw, tmp_path / "out")
    line = one_line(err)
    assert rc == 2 and f"{pat} line 4: cannot parse" in line, line


def test_corrupt_scene_graph_archive_member_names_the_member(tmp_path):
    """PhysioNet ships the scene graphs as scene_graph.zip: a damaged member is a DataError naming it."""
    raw = raw_tree(tmp_path / "raw", n=4)
    sg_dir = raw / "chest-imagenome/1.0.0/silver_dataset/scene_graph"
    archive = sg_dir.with_suffix(".zip")
    names = sorted(p.name for p in sg_dir.iterdir())
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            zf.write(sg_dir / name, f"scene_graph/{name}")
    shutil.rmtree(sg_dir)
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(f"scene_graph/{names[0]}")
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(archive.read_bytes())
    for k in range(start + 5, start + 25):
        data[k] ^= 0x5A  # scramble the deflate stream of the first member
    archive.write_bytes(bytes(data))
    from data_sharding.errors import DataError

    with pytest.raises(DataError) as exc:
        prepare(resolve_roots(raw), tmp_path / "out", PrepareOptions(progress=False))
    assert f"{archive} member scene_graph/{names[0]}" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_truncated_jpeg_is_still_a_counted_skip(tmp_path):
    t = RawTree()
    for i in range(8):
        t.icu_patient(15000001 + i, image="truncated" if i == 0 else "ok")
    raw = t.write(tmp_path / "raw")
    result = prepare(resolve_roots(raw), tmp_path / "out", PrepareOptions(progress=False))
    assert result.report["skipped"]["CXR with truncated JPEG"] == 3  # patient 0's three films

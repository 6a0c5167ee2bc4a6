"""Label files: valid rows round-trip, every kind of bad row is a UserError naming the file and line."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghost_deploy.data.labels import format_label_rows, label_path_for, parse_label_file
from ghost_deploy.errors import UserError

NC = 8


def write(tmp_path: Path, text: str, name: str = "00000000.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_empty_file_means_no_objects(tmp_path):
    labels = parse_label_file(write(tmp_path, ""), NC)
    assert labels.shape == (0, 5) and labels.dtype == np.float32
    assert parse_label_file(write(tmp_path, "\n  \n", "blank.txt"), NC).shape == (0, 5)


def test_valid_rows(tmp_path):
    labels = parse_label_file(write(tmp_path, "3 0.5 0.25 0.1 0.2\n7 1.0000004 0 0.05 1\n"), NC)
    assert labels.shape == (2, 5)
    assert labels[0].tolist() == pytest.approx([3, 0.5, 0.25, 0.1, 0.2])
    assert labels[1, 1] == 1.0  # within tolerance, clipped


@pytest.mark.parametrize("row, problem", [
    ("3 0.5 0.5 0.1", "line 3: expected 5 columns (cls cx cy w h), got 4"),
    ("3 0.5 0.5 0.1 0.1 0.9", "line 3: expected 5 columns (cls cx cy w h), got 6"),
    ("9 0.5 0.5 0.1 0.1", "line 3: class 9 >= nc 8"),
    ("8 0.5 0.5 0.1 0.1", "line 3: class 8 >= nc 8"),
    ("-1 0.5 0.5 0.1 0.1", "line 3: class -1 < 0"),
    ("1.5 0.5 0.5 0.1 0.1", "line 3: class 1.5 is not an integer"),
    ("car 0.5 0.5 0.1 0.1", "line 3: 'car' is not a number"),
    ("1 nan 0.5 0.1 0.1", "line 3: cx is nan (not finite)"),
    ("1 0.5 inf 0.1 0.1", "line 3: cy is inf (not finite)"),
    ("1 1.2 0.5 0.1 0.1", "line 3: cx 1.2 outside [0, 1]"),
    ("1 0.5 -0.01 0.1 0.1", "line 3: cy -0.01 outside [0, 1]"),
    ("1 0.5 0.5 0 0.1", "line 3: w 0 <= 0"),
    ("1 0.5 0.5 0.1 -0.2", "line 3: h -0.2 outside [0, 1]"),
])
def test_bad_row_names_file_and_line(tmp_path, row, problem):
    path = write(tmp_path, f"0 0.5 0.5 0.1 0.1\n\n{row}\n")
    with pytest.raises(UserError) as info:
        parse_label_file(path, NC)
    assert info.value.path == str(path)
    assert info.value.problem == problem
    assert str(path) in str(info.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(UserError, match="label file not found"):
        parse_label_file(tmp_path / "nope.txt", NC)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not UTF-8"):
        parse_label_file(binary, NC)


def test_label_path_replaces_only_the_last_images_folder():
    assert label_path_for("/d/images/VEDAI/images/00000000") == Path("/d/images/VEDAI/labels/00000000.txt")
    # ids and folder names containing "co" are never touched (bug B15 replaced every "co")
    assert label_path_for("/data/corpus/images/co_00000001") == Path("/data/corpus/labels/co_00000001.txt")
    with pytest.raises(UserError, match="folder named 'images'"):
        label_path_for("/data/pictures/0001")


coordinate = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
size = st.floats(min_value=1e-4, max_value=1.0, allow_nan=False)
row = st.tuples(st.integers(0, NC - 1), coordinate, coordinate, size, size)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(row, max_size=12))
def test_valid_rows_round_trip(rows):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.txt"
        path.write_text("".join(f"{c} {x!r} {y!r} {w!r} {h!r}\n" for c, x, y, w, h in rows))
        labels = parse_label_file(path, NC)
        expected = np.array(rows, dtype=np.float32).reshape(-1, 5)
        np.testing.assert_array_equal(labels, expected)
        # and through the 6-decimal writer used by the converters
        path.write_text(format_label_rows(labels))
        np.testing.assert_allclose(parse_label_file(path, NC), expected, atol=5.1e-7)


bad_value = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "x", "1e", "", "0x1"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-5, 20).map(str),
)


@settings(max_examples=150, deadline=None)
@given(good=st.lists(row, max_size=3), values=st.lists(bad_value, min_size=0, max_size=7))
def test_arbitrary_rows_parse_or_raise_user_error(good, values):
    """Whatever a line holds, the parser returns valid labels or raises UserError, nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.txt"
        lines = [f"{c} {x!r} {y!r} {w!r} {h!r}" for c, x, y, w, h in good] + [" ".join(values)]
        path.write_text("\n".join(lines) + "\n")
        try:
            labels = parse_label_file(path, NC)
        except UserError as error:
            assert error.path == str(path)
            assert error.problem.startswith(f"line {len(good) + 1}: ")
            return
        assert labels.shape[1] == 5 and np.isfinite(labels).all()
        assert ((labels[:, 0] >= 0) & (labels[:, 0] < NC) & (labels[:, 0] == np.round(labels[:, 0]))).all()
        assert ((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1)).all() and (labels[:, 3:] > 0).all()
        tokens = " ".join(values).split()
        assert len(tokens) in (0, 5) and all(math.isfinite(float(token)) for token in tokens)

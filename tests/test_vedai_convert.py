"""VEDAI annotation converter: matches the published labels, drops (never merges) classes GHOST lacks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ghost_deploy.data.vedai import GHOST_NAMES, convert_vedai
from ghost_deploy.errors import UserError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "vedai-real"


def line(image_id, cls, xs, ys, centre=None):
    cx, cy = centre if centre else (sum(xs) / 4, sum(ys) / 4)
    return f"{image_id} {cx} {cy} 0.0 {' '.join(map(str, xs))} {' '.join(map(str, ys))} {cls:03d} 1 0\n"


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real VEDAI subset not found at {REAL}")
@pytest.mark.parametrize("folder", ["VEDAI", "VEDAI_1024"])
def test_reproduces_published_labels(tmp_path, folder):
    reference = REAL / folder / "labels"
    ids = sorted(path.stem for path in reference.glob("*.txt"))
    assert ids
    stats = convert_vedai(REAL / "annotation1024.txt", tmp_path, image_size=1024, ids=ids)
    assert stats["images"] == len(ids)
    for image_id in ids:
        expected = np.loadtxt(reference / f"{image_id}.txt", ndmin=2)
        produced = np.loadtxt(tmp_path / f"{image_id}.txt", ndmin=2)
        assert produced.shape == expected.shape, image_id
        order_e = np.lexsort(expected[:, ::-1].T)
        order_p = np.lexsort(produced[:, ::-1].T)
        assert (produced[order_p, 0] == expected[order_e, 0]).all(), image_id
        assert np.abs(produced[order_p, 1:] - expected[order_e, 1:]).max() <= 2 / 1024, image_id


def test_class_map_drops_motorcycle_bus_plane(tmp_path):
    annotation = tmp_path / "ann.txt"
    box = ([10, 30, 30, 10], [20, 20, 40, 40])
    raw_classes = [1, 11, 5, 2, 10, 4, 23, 9, 7, 8, 31]
    annotation.write_text("".join(line("00000001", cls, *box) for cls in raw_classes))
    stats = convert_vedai(annotation, tmp_path / "labels", image_size=1024)
    rows = np.loadtxt(tmp_path / "labels" / "00000001.txt", ndmin=2)
    assert rows[:, 0].tolist() == list(range(8))  # car pickup camping truck other tractor boat van
    np.testing.assert_allclose(rows[0, 1:], [20 / 1024, 30 / 1024, 20 / 1024, 20 / 1024], atol=1e-6)
    assert stats["dropped"] == {"motorcycle": 1, "bus": 1, "plane": 1}
    assert stats["per_class"] == {name: 1 for name in GHOST_NAMES}
    assert stats["per_class"]["van"] == 1  # the motorcycle was not merged into van (bug B15)


def test_512_frame_gives_same_normalised_labels(tmp_path):
    big, small = tmp_path / "a1024.txt", tmp_path / "a512.txt"
    big.write_text(line("7", 1, [100, 140, 140, 100], [200, 200, 260, 260]))
    small.write_text(line("7", 1, [50, 70, 70, 50], [100, 100, 130, 130]))
    convert_vedai(big, tmp_path / "l1024", image_size=1024)
    convert_vedai(small, tmp_path / "l512", image_size=512)
    assert (tmp_path / "l1024" / "00000007.txt").read_text() == (tmp_path / "l512" / "00000007.txt").read_text()


def test_ids_without_objects_get_empty_files_and_boxes_are_clipped(tmp_path):
    annotation = tmp_path / "ann.txt"
    annotation.write_text(line("3", 1, [-20, 20, 20, -20], [10, 10, 30, 30], centre=(0, 20)) + line("4", 31, [1, 2, 2, 1], [1, 1, 2, 2]))
    stats = convert_vedai(annotation, tmp_path / "labels", ids=[3, "4", "00000005"])
    assert (tmp_path / "labels" / "00000004.txt").read_text() == ""  # only a plane: dropped
    assert (tmp_path / "labels" / "00000005.txt").read_text() == ""  # no annotation at all
    row = np.loadtxt(tmp_path / "labels" / "00000003.txt")
    np.testing.assert_allclose(row, [0, 10 / 1024, 20 / 1024, 20 / 1024, 20 / 1024], atol=1e-6)
    assert stats["images"] == 3 and stats["ids_without_annotations"] == 1


@pytest.mark.parametrize("text, problem", [
    ("00000001 1 2 3\n", "line 1: expected 15 fields"),
    ("00000001 a 2 0 1 2 3 4 1 2 3 4 001 1 0\n", "line 1: non-numeric field"),
    ("00000001 1 2 0 1 2 3 4 1 2 3 4 099 1 0\n", "line 1: unknown VEDAI class 99"),
    ("abc 1 2 0 1 2 3 4 1 2 3 4 001 1 0\n", "line 1: image id 'abc'"),
    ("00000001 nan 2 0 1 2 3 4 1 2 3 4 001 1 0\n", "line 1: non-finite coordinate"),
])
def test_malformed_annotation_is_user_error(tmp_path, text, problem):
    annotation = tmp_path / "ann.txt"
    annotation.write_text(text)
    with pytest.raises(UserError) as info:
        convert_vedai(annotation, tmp_path / "labels")
    assert info.value.path == str(annotation) and problem in info.value.problem


def test_missing_annotation_file(tmp_path):
    with pytest.raises(UserError, match="annotation file not found"):
        convert_vedai(tmp_path / "none.txt", tmp_path / "labels")


def test_object_free_images_get_an_empty_label_file(tmp_path):
    """An image with no line in the annotation file still gets a label file (from a fold list or the image
    folder), so the loader keeps it in training and evaluation instead of dropping it."""
    from click.testing import CliRunner

    from ghost_deploy.cli.data import data_group

    annotations = tmp_path / "annotation1024.txt"
    annotations.write_text(line(5, 1, [10, 30, 30, 10], [10, 10, 30, 30]) + "\n")
    fold = tmp_path / "fold01.txt"
    fold.write_text("00000005\n00000007\n")
    images = tmp_path / "images"
    images.mkdir()
    (images / "00000009_co.png").write_bytes(b"")
    out = tmp_path / "labels"
    result = CliRunner().invoke(data_group, ["convert-vedai", str(annotations), str(out), "--ids", str(fold),
                                             "--images", str(images)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["00000005.txt", "00000007.txt", "00000009.txt"]
    assert (out / "00000007.txt").read_text() == "" and (out / "00000009.txt").read_text() == ""
    assert (out / "00000005.txt").read_text().strip()
    bad = CliRunner().invoke(data_group, ["convert-vedai", str(annotations), str(out), "--images", str(tmp_path / "no")])
    assert bad.exit_code == 2 and "image folder not found" in bad.output


def test_an_empty_annotation_file_with_no_ids_is_refused(tmp_path):
    annotations = tmp_path / "annotation.txt"
    annotations.write_text("\n\n")
    with pytest.raises(UserError, match="no annotation line: nothing to convert"):
        convert_vedai(annotations, tmp_path / "labels")
    assert not (tmp_path / "labels").exists()
    # with ids (fold lists, the image folder) an empty file is valid: every image is object-free
    stats = convert_vedai(annotations, tmp_path / "labels", ids=["1"])
    assert stats["images"] == 1 and (tmp_path / "labels" / "00000001.txt").read_text() == ""

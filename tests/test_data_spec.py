"""Dataset YAML loading: valid files give a DatasetSpec, anything else a UserError naming yaml and key."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ghost_deploy.data.spec import DatasetSpec, load_dataset_yaml
from ghost_deploy.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = {"vedai": 8, "nwpu-vhr10": 10, "dota": 15, "dior": 20, "vedai-real": 8}


def make_tree(base: Path) -> None:
    (base / "ds" / "images").mkdir(parents=True, exist_ok=True)
    (base / "ds" / "hr" / "images").mkdir(parents=True, exist_ok=True)
    (base / "ds" / "train.txt").write_text("00000000\n")
    (base / "lists").mkdir(exist_ok=True)
    (base / "lists" / "val.txt").write_text("00000000\n")


def valid_doc() -> dict:
    return {"path": "ds", "train": "train.txt", "val": "../lists/val.txt", "test": "images", "hr": "hr",
            "nc": 2, "names": ["car", "car_running"], "modalities": ["rgb", "ir"], "ir_only_classes": ["car_running"]}


def write_yaml(base: Path, doc) -> Path:
    path = base / "data.yaml"
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


def test_valid_yaml_resolves_paths(tmp_path):
    make_tree(tmp_path)
    spec = load_dataset_yaml(write_yaml(tmp_path, valid_doc()))
    assert spec.root == tmp_path / "ds"
    assert spec.train == tmp_path / "ds" / "train.txt"
    assert spec.val == tmp_path / "lists" / "val.txt"
    assert spec.test == tmp_path / "ds" / "images"
    assert spec.hr_root == tmp_path / "ds" / "hr"
    assert spec.names == ("car", "car_running") and spec.modalities == ("rgb", "ir")
    assert spec.ir_only_class_ids == (1,)


def test_list_relative_to_yaml_folder_when_not_under_root(tmp_path):
    make_tree(tmp_path)
    spec = load_dataset_yaml(write_yaml(tmp_path, valid_doc() | {"val": "lists/val.txt"}))
    assert spec.val == tmp_path / "lists" / "val.txt"


@pytest.mark.parametrize("key", ["path", "train", "val", "nc", "names", "modalities"])
def test_missing_key(tmp_path, key):
    make_tree(tmp_path)
    doc = valid_doc()
    del doc[key]
    path = write_yaml(tmp_path, doc)
    with pytest.raises(UserError) as info:
        load_dataset_yaml(path)
    assert info.value.path == str(path) and info.value.problem == f"missing key {key!r}"


@pytest.mark.parametrize("change, problem", [
    ({"nc": 3}, "key 'names': 2 names but nc is 3"),
    ({"nc": 0}, "key 'nc': expected a positive integer, got 0"),
    ({"nc": "two"}, "key 'nc': expected a positive integer, got 'two'"),
    ({"modalities": ["rgb", "thermal"]}, "key 'modalities': unknown modality 'thermal' (expected rgb, ir)"),
    ({"modalities": []}, "key 'modalities': expected a non-empty list such as [rgb, ir], got []"),
    ({"modalities": ["ir", "ir"]}, "key 'modalities': 'ir' listed twice"),
    ({"names": ["car", "car"]}, "key 'names': class names must be unique"),
    ({"train": "missing.txt"}, "does not exist"),
    ({"path": "nowhere"}, "is not a folder"),
    ({"hr": "nohr"}, "key 'hr':"),
    ({"ir_only_classes": ["boat"]}, "key 'ir_only_classes': 'boat' is not one of the class names"),
])
def test_bad_values(tmp_path, change, problem):
    make_tree(tmp_path)
    path = write_yaml(tmp_path, valid_doc() | change)
    with pytest.raises(UserError) as info:
        load_dataset_yaml(path)
    assert info.value.path == str(path)
    assert problem in info.value.problem


def test_unreadable_yaml(tmp_path):
    with pytest.raises(UserError, match="dataset yaml not found"):
        load_dataset_yaml(tmp_path / "none.yaml")
    with pytest.raises(UserError, match="invalid YAML"):
        load_dataset_yaml(write_yaml(tmp_path, "train: [unclosed\n"))
    with pytest.raises(UserError, match="must be a mapping"):
        load_dataset_yaml(write_yaml(tmp_path, "- a\n- b\n"))


def test_names_mapping_and_optional_test(tmp_path):
    make_tree(tmp_path)
    doc = valid_doc() | {"names": {0: "car", 1: "van"}, "ir_only_classes": [1]}
    del doc["test"]
    spec = load_dataset_yaml(write_yaml(tmp_path, doc))
    assert spec.names == ("car", "van") and spec.test is None and spec.ir_only_classes == ("van",)
    with pytest.raises(UserError, match="no 'test' split"):
        spec.split_source("test")


@pytest.mark.parametrize("name, nc", TEMPLATES.items())
def test_templates_have_consistent_classes(name, nc):
    spec = load_dataset_yaml(REPO / "training" / "data" / f"{name}.yaml", check_paths=False)
    assert spec.nc == nc == len(spec.names)


def test_template_paths_are_checked():
    with pytest.raises(UserError, match="key 'path'"):
        load_dataset_yaml(REPO / "training" / "data" / "dota.yaml")


junk = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 30), st.floats(allow_nan=True), st.text(max_size=8),
    st.lists(st.one_of(st.text(max_size=6), st.integers(-2, 5)), max_size=4),
    st.dictionaries(st.integers(-1, 3), st.text(max_size=4), max_size=3),
)
keys = st.sampled_from(["path", "train", "val", "test", "hr", "nc", "names", "modalities", "ir_only_classes"])


@settings(max_examples=120, deadline=None)
@given(mutations=st.lists(st.tuples(keys, st.one_of(st.just("<delete>"), junk)), max_size=3))
def test_any_yaml_is_spec_or_user_error(mutations):
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        make_tree(base)
        doc = valid_doc()
        for key, value in mutations:
            if value == "<delete>":
                doc.pop(key, None)
            else:
                doc[key] = value
        path = write_yaml(base, doc)
        try:
            spec = load_dataset_yaml(path)
        except UserError as error:
            assert error.path == str(path)
            return
        assert isinstance(spec, DatasetSpec)
        assert spec.nc == len(spec.names) and set(spec.modalities) <= {"rgb", "ir"} and spec.modalities
        assert spec.root.is_dir() and spec.train.exists() and spec.val.exists()
        if not mutations:
            assert spec.names == ("car", "car_running")

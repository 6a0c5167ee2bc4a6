"""`ghost-deploy bench` on a tiny model (ghost-n at 64 px): backends, JSON schema, report, plots, compare gate."""
from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ghost_deploy.bench import (Backend, BackendUnavailable, OrtBackend, TorchBackend, TrtBackend, artifacts_from_run,
                                compare_results, load_result, normalise_artifacts, run_bench)
from ghost_deploy.bench.accuracy import _ground_truth, evaluate_backends
from ghost_deploy.cli.bench import bench_command
from ghost_deploy.bench.prepost import head_spec_from_meta, preprocess, synthetic_frames
from ghost_deploy.bench.report import PLOTS, format_table
from ghost_deploy.checkpoint import read_meta, save_checkpoint
from ghost_deploy.errors import UserError
from ghost_deploy.parity.runners import Runner
from ghost_deploy.model import build_model

SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "bench-schema.json"
IMG = 64
NAMES = ["car", "car_running", "truck", "van", "boat"]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _meta(model, data_yaml, bit_plan=None) -> dict:
    return {"model": "ghost-n", "nc": len(NAMES), "names": NAMES, "input_mode": "rgb+ir",
            "input_names": list(model.input_names), "img_size": IMG, "strides": model.detect.stride.tolist(),
            "anchors_pixels": model.detect.anchors_pixels.tolist(), "bit_plan": bit_plan, "data": str(data_yaml)}


def _tiny_model(seed: int):
    torch.manual_seed(seed)
    model = build_model("ghost-n", nc=len(NAMES), input_mode="rgb+ir").eval()
    with torch.no_grad():  # confident objectness, so NMS and mAP see real detections from an untrained net
        for conv in model.detect.m:
            conv.bias.view(model.detect.na, -1)[:, 4] = 1.0
    return model


def _export(model, path: Path, dynamic: bool) -> None:
    inputs = (torch.rand(1, 3, IMG, IMG), torch.rand(1, 1, IMG, IMG))
    axes = {"rgb": {0: "batch"}, "ir": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; it is only a fixture here
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, inputs, str(path), input_names=["rgb", "ir"], output_names=["p4", "p8", "p16"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from ghost_deploy.data import ensure_synthetic_dataset
    from ghost_deploy.quant import quantize_model, uniform_plan
    from ghost_deploy.quant.trace import example_inputs

    root = tmp_path_factory.mktemp("bench")
    data_yaml = ensure_synthetic_dataset(root=root / "data", n_train=1, n_val=3, n_test=0, img_size=IMG)
    teacher = _tiny_model(0)
    save_checkpoint(root / "teacher.safetensors", teacher, _meta(teacher, data_yaml))
    _export(teacher, root / "fp32.onnx", dynamic=True)
    _export(teacher, root / "fp32-static.onnx", dynamic=False)

    student = _tiny_model(1)
    plan = uniform_plan(student, weight_bits=4, act_bits=8, image_size=IMG)
    student = quantize_model(student, plan, example_inputs=example_inputs(student, IMG), scale_init="max")
    save_checkpoint(root / "ghost.safetensors", student, _meta(student, data_yaml, plan.to_dict()))
    return {"root": root, "data": data_yaml, "teacher": root / "teacher.safetensors", "ghost": root / "ghost.safetensors",
            "onnx": root / "fp32.onnx", "static": root / "fp32-static.onnx", "plan": plan}


@pytest.fixture(scope="module")
def bench_run(workdir):
    """One CLI run over every backend kind; TensorRT (absent here) must come out as skipped, not as a crash."""
    out = workdir["root"] / "out"
    args = ["--checkpoint", str(workdir["teacher"]), "--checkpoint", str(workdir["ghost"]),
            "--onnx", str(workdir["onnx"]), "--onnx", str(workdir["static"]),
            "--batch", "1", "--batch", "2", "--iterations", "4", "--warmup-max", "3", "--threads", "1",
            "--max-images", "3", "--out", str(out), "--no-progress"]
    if not HAS_TENSORRT:
        fake_engine = workdir["root"] / "model.engine"
        fake_engine.write_bytes(b"not an engine")
        args += ["--engine", str(fake_engine)]
    result = CliRunner().invoke(bench_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output, "json": json.loads((out / "bench.json").read_text())}


def _backend(result: dict, name: str) -> dict:
    return next(record for record in result["backends"] if record["name"] == name)


# ------------------------------------------------------------------------------------------ the run
def test_json_matches_schema(bench_run):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(bench_run["json"], schema, cls=jsonschema.Draft202012Validator)


def test_schema_rejects_a_result_missing_latency_stats(bench_run):
    jsonschema = pytest.importorskip("jsonschema")
    broken = copy.deepcopy(bench_run["json"])
    del _backend(broken, "ort-fp32")["latency"][0]["infer"]["p99_ms"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()), cls=jsonschema.Draft202012Validator)


def test_every_cpu_backend_has_latency_size_and_map(bench_run):
    result = bench_run["json"]
    for name, precision in (("torch-fp32", "fp32"), ("torch-ghost", "fake-quant"), ("ort-fp32", "fp32")):
        record = _backend(result, name)
        assert record["status"] == "ok" and record["precision"] == precision
        assert [entry["batch"] for entry in record["latency"]] == [1, 2]
        for entry in record["latency"]:
            infer = entry["infer"]
            assert infer["count"] == 4 and len(entry["samples_ms"]) == 4
            assert 0 < infer["min_ms"] <= infer["p50_ms"] <= infer["p99_ms"] <= infer["max_ms"]
            assert entry["end_to_end"]["total"]["p50_ms"] > 0
        assert record["size_mb"] > 0 and record["memory"]["peak_rss_mb"] > 0
        assert record["accuracy"]["images"] == 3 and len(record["accuracy"]["per_class"]) == len(NAMES)
    # the same weights in PyTorch and in ONNX Runtime score the same
    torch_map = _backend(result, "torch-fp32")["accuracy"]["mAP50"]
    assert _backend(result, "ort-fp32")["accuracy"]["mAP50"] == pytest.approx(torch_map, abs=1e-3)
    roles = sorted(entry["role"] for entry in result["sizes"]["files"])
    assert roles.count("checkpoint") == 2 and roles.count("onnx") == 2


def test_static_onnx_skips_other_batch_sizes(bench_run):
    record = _backend(bench_run["json"], "ort-fp32-static")
    assert record["status"] == "ok"
    assert "infer" in record["latency"][0] and record["latency"][0]["batch"] == 1
    assert record["latency"][1] == {"batch": 2, "skipped": "fixed batch 1 (static input shape)"}
    assert record["accuracy"]["images"] == 3  # fed one image at a time


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the engine path is covered by the trt tests")
def test_engine_without_tensorrt_is_skipped_with_reason(bench_run):
    record = _backend(bench_run["json"], "trt-model")
    assert record["status"] == "skipped" and "tensorrt" in record["reason"].lower()
    assert "trt-model" in bench_run["output"] and "skipped" in bench_run["output"]


def test_bit_plan_size_and_bops_come_from_the_plan(bench_run, workdir):
    from ghost_deploy.quant import bops, size_mb

    plan_summary = bench_run["json"]["sizes"]["bit_plan"]
    assert plan_summary["size_mb"] == pytest.approx(size_mb(workdir["plan"]))
    assert plan_summary["bops_g"] == pytest.approx(bops(workdir["plan"]) / 1e9)
    assert {layer["weight_bits"] for layer in plan_summary["layers"]} == {4}


def test_terminal_table_and_markdown_report(bench_run):
    output = bench_run["output"]
    header = next(line for line in output.splitlines() if line.startswith("backend"))
    for column in ("p50 ms", "p99 ms", "size MB", "mAP50", "mAP50:95"):
        assert column in header
    report = (bench_run["out"] / "report.md").read_text()
    for name in ("torch-fp32", "torch-ghost", "ort-fp32"):
        assert name in output and name in report
    for png in PLOTS.values():
        assert f"]({png})" in report
        path = bench_run["out"] / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        from PIL import Image

        with Image.open(path) as image:
            assert image.size[0] > 300 and image.size[1] > 200
            pixels = np.asarray(image.convert("L"))
            assert pixels.std() > 5  # something was drawn, not a blank canvas


# ------------------------------------------------------------------------------------------ compare
def test_compare_flags_a_latency_regression_and_passes_on_equal(bench_run):
    new = bench_run["json"]
    assert compare_results(new, new)["passed"]
    faster_old = copy.deepcopy(new)
    for record in faster_old["backends"]:
        for entry in record["latency"]:
            if "infer" in entry:
                entry["infer"]["p50_ms"] /= 2
    comparison = compare_results(faster_old, new, max_regression=0.10)
    assert not comparison["passed"]
    assert any("torch-fp32 batch 1: p50" in item for item in comparison["regressions"])
    assert compare_results(faster_old, new, max_regression=1.5)["passed"]


def test_compare_flags_a_map_drop(bench_run):
    new = bench_run["json"]
    better_old = copy.deepcopy(new)
    _backend(better_old, "ort-fp32")["accuracy"]["mAP50_95"] += 0.05
    comparison = compare_results(better_old, new, max_regression=10.0, max_map_drop=0.01)
    assert comparison["regressions"] == [item for item in comparison["regressions"] if item.startswith("ort-fp32: mAP50_95")]
    assert len(comparison["regressions"]) == 1


def test_compare_cli_exit_codes(bench_run, tmp_path):
    new_path = bench_run["out"] / "bench.json"
    faster = copy.deepcopy(bench_run["json"])
    for record in faster["backends"]:
        for entry in record["latency"]:
            if "infer" in entry:
                entry["infer"]["p50_ms"] /= 2
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(faster))
    runner = CliRunner()
    failed = runner.invoke(bench_command, ["--compare", str(old_path), "--against", str(new_path)])
    assert failed.exit_code == 1 and "REGRESSION" in failed.output
    same = runner.invoke(bench_command, ["--compare", str(new_path), "--against", str(new_path)])
    assert same.exit_code == 0 and "no regression" in same.output


def test_compare_refuses_different_power_modes(bench_run, tmp_path):
    jetson_run = copy.deepcopy(bench_run["json"])
    jetson_run["board"] = {"is_jetson": True, "power_mode": {"name": "MAXN", "id": 0}, "clocks": {"clocks_pinned": True}}
    other_mode = copy.deepcopy(jetson_run)
    other_mode["board"]["power_mode"] = {"name": "15W", "id": 2}
    with pytest.raises(UserError, match="power mode differs"):
        compare_results(jetson_run, other_mode)
    with pytest.raises(UserError, match="power mode differs"):
        compare_results(jetson_run, bench_run["json"])
    assert compare_results(jetson_run, copy.deepcopy(jetson_run))["passed"]
    old_path, new_path = tmp_path / "old.json", tmp_path / "new.json"
    old_path.write_text(json.dumps(jetson_run))
    new_path.write_text(json.dumps(other_mode))
    refused = CliRunner().invoke(bench_command, ["--compare", str(old_path), "--against", str(new_path)])
    assert refused.exit_code == 2 and "power mode differs" in refused.output


def test_compare_refuses_runs_with_nothing_in_common(bench_run):
    renamed = copy.deepcopy(bench_run["json"])
    for record in renamed["backends"]:
        record["name"] += "-other"
    with pytest.raises(UserError, match="nothing to compare"):
        compare_results(renamed, bench_run["json"])


def test_load_result_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "ghost-deploy/engine-receipt/1"}))
    with pytest.raises(UserError, match="not a ghost-deploy bench result"):
        load_result(path)
    path.write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        load_result(path)


# ------------------------------------------------------------------------------------------ parts
class OracleBackend(Backend):
    """Head maps that decode exactly to the ground truth of the image fed: bench must score it mAP 1.

    It inverts the YOLOv5 decoding with the strides and anchors of the head spec, so it checks the
    whole accuracy path (letterboxed inputs, ground truth pixels, decode parameters, NMS, scoring).
    Also shows that a new backend is one small class.
    """

    kind = "oracle"

    def __init__(self, spec, dataset):
        super().__init__("oracle", "exact", {})
        self.spec = spec
        self.truth = {}
        for index in range(len(dataset)):
            item = dataset[index]
            self.truth[item["rgb"].numpy().tobytes()] = item["labels"][:, 1:].numpy() * [1, IMG, IMG, IMG, IMG]

    def _open(self):
        backend = self

        class OracleRunner(Runner):  # the runner interface every stage shares (parity.runners)
            input_names = list(self.spec.input_names)
            output_names = [f"head_s{int(s)}" for s in self.spec.strides]

            def infer(self, feed):
                return dict(zip(self.output_names, backend.oracle_heads(feed)))

        return OracleRunner()

    def oracle_heads(self, feed):
        spec, batch = self.spec, feed["rgb"].shape[0]
        anchors = np.asarray(spec.anchors_pixels, dtype=np.float64)
        na, no = anchors.shape[1], spec.outputs_per_anchor
        heads = [np.full((batch, na, no, IMG // int(s), IMG // int(s)), -30.0, np.float32) for s in spec.strides]
        logit = lambda p: np.log(p / (1 - p))  # noqa: E731
        for image in range(batch):
            for cls, cx, cy, w, h in self.truth[feed["rgb"][image].tobytes()]:
                # the level and anchor whose shape is closest to the box
                level, anchor = min(np.ndindex(*anchors.shape[:2]),
                                    key=lambda la: abs(np.log(w / anchors[la][0])) + abs(np.log(h / anchors[la][1])))
                stride = spec.strides[level]
                gx, gy = int(cx // stride), int(cy // stride)
                cell = heads[level][image, anchor, :, gy, gx]
                cell[0] = logit((cx / stride - gx + 0.5) / 2)
                cell[1] = logit((cy / stride - gy + 0.5) / 2)
                cell[2] = logit(np.sqrt(w / anchors[level, anchor, 0]) / 2)
                cell[3] = logit(np.sqrt(h / anchors[level, anchor, 1]) / 2)
                cell[4] = 30.0
                cell[5 + int(cls)] = 30.0
        return [head.reshape(batch, na * no, *head.shape[-2:]) for head in heads]


def test_accuracy_path_scores_an_exact_detector_at_map_one(workdir):
    from ghost_deploy.data import load_dataset_yaml
    from ghost_deploy.data.dataset import Dataset

    spec = head_spec_from_meta(read_meta(workdir["teacher"]), str(workdir["teacher"]))
    dataset = Dataset(load_dataset_yaml(workdir["data"]), "val", IMG, augment=False)
    with OracleBackend(spec, dataset) as oracle:
        results = evaluate_backends([oracle], spec, str(workdir["data"]), "val", batch_size=2)
    assert results["oracle"]["images"] == 3
    assert results["oracle"]["mAP50"] == pytest.approx(1.0)
    assert results["oracle"]["mAP50_95"] > 0.99


def test_numpy_decoding_matches_the_model_head(workdir):
    """The decode parameters bench reads from the checkpoint give what the model's own Detect gives."""
    from ghost_deploy.eval.evaluate import decode_heads
    from ghost_deploy.eval.postprocess import decode_heads_np

    spec = head_spec_from_meta(read_meta(workdir["teacher"]), str(workdir["teacher"]))
    feed = preprocess(synthetic_frames(spec.input_names, 2, IMG), spec.input_names, IMG)
    with TorchBackend(workdir["teacher"], threads=1) as backend:
        heads = backend.infer(feed)
        expected = decode_heads([torch.from_numpy(h) for h in heads], backend.model.detect).numpy()
    got = decode_heads_np(heads, spec.strides, spec.anchors_pixels, spec.nc)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_ground_truth_matches_val_py(workdir):
    from ghost_deploy.data import load_dataset_yaml
    from ghost_deploy.data.dataset import Dataset, collate
    from ghost_deploy.eval.val import ground_truth

    dataset = Dataset(load_dataset_yaml(workdir["data"]), "val", IMG, augment=False)
    batch = collate([dataset[i] for i in range(3)])
    assert len(batch["targets"]) > 0
    for index in range(3):
        np.testing.assert_allclose(_ground_truth(batch["targets"].numpy(), index, IMG, IMG),
                                   ground_truth(batch, index, IMG, IMG), atol=1e-4)


def test_preprocess_letterboxes_both_sensors_alike():
    frames = synthetic_frames(["rgb", "ir"], 2, IMG)
    assert frames[0]["rgb"].shape == (2 * IMG, (8 * IMG) // 3, 3) and frames[0]["ir"].shape == (2 * IMG, (8 * IMG) // 3)
    feed = preprocess(frames, ["rgb", "ir"], IMG)
    assert feed["rgb"].shape == (2, 3, IMG, IMG) and feed["ir"].shape == (2, 1, IMG, IMG)
    assert feed["rgb"].dtype == np.float32 and 0 <= feed["rgb"].min() and feed["rgb"].max() <= 1
    pad = np.float32(114 / 255)
    # 4:3 frame -> content 64 x 48, padded top and bottom by 8 rows in both sensors
    assert np.allclose(feed["rgb"][:, :, :8], pad) and np.allclose(feed["ir"][:, :, :8], pad)
    assert not np.allclose(feed["ir"][:, :, 8:56], pad)


def test_preprocess_of_dataset_frames_equals_the_validation_inputs(workdir):
    from ghost_deploy.bench.prepost import dataset_frame_paths, decode_frame
    from ghost_deploy.data import load_dataset_yaml
    from ghost_deploy.data.dataset import Dataset

    frames = [decode_frame(paths) for paths in dataset_frame_paths(workdir["data"], "val", ["rgb", "ir"], 3)]
    feed = preprocess(frames, ["rgb", "ir"], 48)  # 64 px tiles scaled down, then letterboxed
    dataset = Dataset(load_dataset_yaml(workdir["data"]), "val", 48, augment=False)
    for index in range(3):
        item = dataset[index]
        np.testing.assert_array_equal(feed["rgb"][index], item["rgb"].numpy())
        np.testing.assert_array_equal(feed["ir"][index], item["ir"].numpy())


def test_backend_errors(workdir, tmp_path):
    with pytest.raises(UserError, match="no bit plan"):
        TorchBackend(workdir["teacher"], fake_quant=True)
    with pytest.raises(UserError, match="has a bit plan"):
        TorchBackend(workdir["ghost"], fake_quant=False)
    with pytest.raises(UserError, match="not found"):
        OrtBackend(tmp_path / "missing.onnx")
    with pytest.raises(UserError, match="not found"):
        TrtBackend(tmp_path / "missing.engine")
    if not HAS_TENSORRT:
        engine = tmp_path / "x.engine"
        engine.write_bytes(b"x")
        with pytest.raises(BackendUnavailable):
            TrtBackend(engine).load()


def test_artifacts_from_run_folder(tmp_path):
    for relative in ("teacher/weights/best.safetensors", "ghost/weights/best.safetensors", "export/ghost.onnx",
                     "export/ghost-cpu.onnx", "engine/ghost.engine", "engine/ghost.FAILED.engine"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = artifacts_from_run(tmp_path)
    assert [Path(p).parts[-3] for p in found["checkpoints"]] == ["teacher", "ghost"]
    assert [Path(p).name for p in found["onnx"]] == ["ghost-cpu.onnx", "ghost.onnx"]
    assert [Path(p).name for p in found["engines"]] == ["ghost.engine"]
    with pytest.raises(UserError, match="no artifacts found"):
        artifacts_from_run(tmp_path / "teacher")
    with pytest.raises(UserError, match="nothing to bench"):
        normalise_artifacts({})
    assert normalise_artifacts({"teacher": "a", "ghost": "b", "onnx": ["c", "c"]}) == {
        "checkpoints": ["a", "b"], "onnx": ["c"], "engines": []}


def test_exported_onnx_metadata_is_read(workdir, tmp_path):
    """The exporter's ghost.* metadata gives the precision label, the decode parameters and the head outputs."""
    import onnx

    from ghost_deploy.bench.prepost import head_outputs, head_spec_from_onnx
    from ghost_deploy.bench.sizes import onnx_precision
    from ghost_deploy.contract import OnnxMetadata
    from ghost_deploy.export.metadata import set_metadata

    model = onnx.load(str(workdir["onnx"]))
    assert head_spec_from_onnx(workdir["onnx"]) is None and onnx_precision(workdir["onnx"]) == "fp32"
    teacher = read_meta(workdir["teacher"])
    def tagged(img_size: int):
        return OnnxMetadata(model="ghost-n", nc=5, names=list(NAMES), input_mode="rgb+ir", input_names=["rgb", "ir"],
                            img_size=img_size, strides=teacher.strides, anchors=teacher.anchors_pixels,
                            head_output_names=[o.name for o in model.graph.output],
                            output_names=[o.name for o in model.graph.output], bit_plan=None, precision="qdq",
                            target="cpu")

    set_metadata(model, tagged(IMG))
    path = tmp_path / "tagged.onnx"
    onnx.save(model, str(path))
    assert onnx_precision(path) == "int8-qdq-cpu"
    spec = head_spec_from_onnx(path)
    assert spec.nc == 5 and spec.img_size == IMG and spec.input_names == ("rgb", "ir")
    assert np.allclose(spec.anchors_pixels, teacher.anchors_pixels)
    with pytest.raises(UserError, match="img_size is 32"):
        set_metadata(model, tagged(32))
        onnx.save(model, str(path))
        run_bench({"checkpoints": [workdir["teacher"]], "onnx": [path]}, tmp_path / "out")
    assert head_outputs(["boxes", "head_s16", "head_s4", "head_s8"]) == ["head_s4", "head_s8", "head_s16"]
    assert head_outputs(["p4", "p8", "boxes"], declared=["p4", "p8"]) == ["p4", "p8"]
    assert head_outputs(["a", "b"]) == ["a", "b"]


def test_table_reports_skipped_backends():
    result = {"backends": [{"name": "trt-x", "precision": "engine", "status": "skipped", "reason": "no TensorRT",
                            "latency": [], "accuracy": None, "size_mb": 1.0}]}
    assert "skipped: no TensorRT" in format_table(result)

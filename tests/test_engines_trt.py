"""Real TensorRT build and run of a tiny Q/DQ ONNX, in whichever TensorRT world (10.x or 11.x) is installed.

Skipped without TensorRT and a CUDA GPU; nothing here mocks TensorRT.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ghost_deploy.parity.compare import Budgets, compare_outputs
from ghost_deploy.engines.receipt import observe_environment, plan_precision_report, verify_runtime
from ghost_deploy.engines.targets import detect_jetson, load_target
from ghost_deploy.errors import ParityError


def _environment():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return None
    env = observe_environment()
    return env if env.get("compute_capability") else None


ENV = _environment()
pytestmark = [pytest.mark.trt, pytest.mark.skipif(ENV is None, reason="TensorRT and a CUDA GPU are required")]


def _helpers():
    """The tiny-model builders live in test_engines.py (loaded by path: tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("engine_test_helpers", Path(__file__).with_name("test_engines.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    helpers = _helpers()
    folder = tmp_path_factory.mktemp("trt")
    onnx_path = helpers.make_qdq_onnx(folder / "tiny.onnx")
    helpers.make_parity_set(onnx_path, folder / "tiny.parity.npz")
    return helpers, onnx_path, folder / "tiny.parity.npz"


def _profile():
    return detect_jetson() or load_target("x86-gpu")


@pytest.mark.parametrize("strongly_typed", [False, True])
def test_build_and_run_qdq_engine(tiny, tmp_path, strongly_typed):
    from ghost_deploy.parity.runners import OrtRunner
    from ghost_deploy.engines.trt import EngineRunner, build_engine, trt_major

    helpers, onnx_path, _ = tiny
    if strongly_typed and trt_major() >= 11:
        pytest.skip("11.x is always strongly typed; covered by the other case")
    result = build_engine(onnx_path, tmp_path / "tiny.engine", _profile(), batch=(1, 2, 2),
                          timing_cache=tmp_path / "timing.cache", strongly_typed=strongly_typed, progress=False)
    assert Path(result.engine_path).is_file() and (tmp_path / "timing.cache").is_file()
    assert result.trt_world == trt_major() and result.layers
    assert any(layer["precision"] == "INT8" for layer in result.layers), result.layers
    mapping = plan_precision_report(result.layers, helpers.BIT_PLAN)
    assert not mapping["unmapped"], mapping

    feed = {"rgb": np.random.default_rng(3).random((2, 3, 32, 32), dtype=np.float32)}
    with EngineRunner(result.engine_path) as engine, OrtRunner(onnx_path) as ort:
        assert engine.input_names == ["rgb"] and sorted(engine.output_names) == ["p3", "p4"]
        report = compare_outputs(ort.infer(feed), engine.infer(feed), Budgets(min_cosine=0.999))
    assert report.passed, report.format_table()


def test_build_entry_point_writes_verified_engine_and_receipt(tiny, tmp_path):
    from ghost_deploy.engines import build

    _, onnx_path, parity_path = tiny
    profile = _profile()
    result = build(onnx_path, profile.name, tmp_path, parity_set=parity_path,
                   budgets=Budgets(min_cosine=0.999, max_score_delta=0.05, allow_missing=1, allow_extra=1).to_dict(),
                   progress=False)
    assert result["status"] == "engine"
    engine = result["engines"][0]
    receipt = json.loads(Path(engine["receipt"]).read_text())
    assert receipt["built"] and receipt["parity"]["passed"] and receipt["hashes"]["engine"]
    assert receipt["environment"]["compute_capability"] == ENV["compute_capability"]
    assert verify_runtime(engine["receipt"]) == []


def test_engine_failing_parity_is_kept_only_as_failed(tiny, tmp_path):
    from ghost_deploy.engines import build

    helpers, onnx_path, _ = tiny
    perturbed = helpers.make_parity_set(onnx_path, tmp_path / "bad.parity.npz", perturb=3.0)
    with pytest.raises(ParityError, match="p4"):
        build(onnx_path, _profile().name, tmp_path, parity_set=perturbed, progress=False)
    assert [p.name for p in tmp_path.glob("*.engine")] == [f"tiny-{_profile().name}.FAILED.engine"]

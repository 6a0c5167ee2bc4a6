"""`ghost-deploy sample`: a random-weight, calibrated checkpoint of any config, off the grid like a trained one."""
from click.testing import CliRunner

from ghost_deploy.checkpoint import read_meta
from ghost_deploy.cli.export import sample_command
from ghost_deploy.export import export_onnx


def test_sample_writes_a_checkpoint_that_exports_through_the_default_gate(tmp_path, write_image_pairs):
    out = tmp_path / "s.safetensors"
    result = CliRunner().invoke(sample_command, ["ghost-p", "--img-size", "64", "--bits", "4", "--nc", "3",
                                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    header = read_meta(out)
    assert header.model == "ghost-p" and header.nc == 3 and header.img_size == 64
    assert {layer.weight_bits for layer in header.bit_plan.layers.values()} == {4}
    write_image_pairs(tmp_path / "images", count=2, seed=3)
    exported = export_onnx(out, tmp_path / "s.onnx", parity_images=tmp_path / "images", progress=False)
    assert exported.passed and exported.report["parity"]["arithmetic"] == "exact" and exported.exact.bit_identical
    assert read_meta(out).recipe["parity"]["arithmetic"] == "exact"


def test_sample_refuses_bad_options(tmp_path):
    bad = CliRunner().invoke(sample_command, ["ghost-p", "--bits", "9", "--out", str(tmp_path / "s.safetensors")])
    assert bad.exit_code == 2 and "--bits" in bad.output
    bad = CliRunner().invoke(sample_command, ["ghost-p", "--out", str(tmp_path / "s.onnx")])
    assert bad.exit_code == 2 and "must end in .safetensors" in bad.output

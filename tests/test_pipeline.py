"""The pipeline's stage ledger (pipeline.json): what it skips and what it never skips."""



def test_a_failed_stage_is_never_skipped(tmp_path):
    from ghost_deploy.pipeline import _StageLedger

    out = tmp_path / "ghost.onnx"
    out.write_text("x")
    ledger = _StageLedger(tmp_path)
    ledger.record("export", "abc", [out], {"onnx": {}, "failed": True})
    assert _StageLedger(tmp_path).fresh("export", "abc") is None
    ledger.record("export", "abc", [out], {"onnx": {}, "failed": False})
    assert _StageLedger(tmp_path).fresh("export", "abc")["fingerprint"] == "abc"
    assert _StageLedger(tmp_path).fresh("export", "other") is None

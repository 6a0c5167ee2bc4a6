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


def test_a_code_change_changes_every_fingerprint(monkeypatch):
    """Stages that passed re-run after the package's source changes, even at the same version number."""
    from ghost_deploy import pipeline

    assert len(pipeline.code_sha256()) == 64
    before = pipeline._fingerprint("teacher", {"epochs": 1})
    assert pipeline._fingerprint("teacher", {"epochs": 1}) == before
    monkeypatch.setattr(pipeline, "code_sha256", lambda: "edited")
    assert pipeline._fingerprint("teacher", {"epochs": 1}) != before

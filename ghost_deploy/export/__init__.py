"""Export stage: checkpoint -> QDQ ONNX with the trained per-layer bits, TensorRT lint, parity gate vs PyTorch.

See docs/export.md. Public API: `export_onnx`, `load_our_onnx`, `lint_qdq`.
"""
from ghost_deploy.export.api import ExportResult, export_onnx, format_report
from ghost_deploy.export.lint import Finding, lint_qdq
from ghost_deploy.export.metadata import load_our_onnx

__all__ = ["ExportResult", "export_onnx", "format_report", "Finding", "lint_qdq", "load_our_onnx"]

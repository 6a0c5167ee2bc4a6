"""Data stage: dataset YAMLs, RGB/IR loading, augmentation, the embedded synthetic set, VEDAI conversion,
calibration and parity-set manifests.

What this package root exports is torch-free (the engine stage reads images through it on a Jetson);
the training `Dataset` and `collate` (PyTorch) live in `ghost_deploy.data.dataset`.
"""
from ghost_deploy.data.labels import parse_label_file
from ghost_deploy.data.spec import DatasetSpec, load_dataset_yaml
from ghost_deploy.data.synth import ensure_synthetic_dataset
from ghost_deploy.data.vedai import convert_vedai

__all__ = ["DatasetSpec", "convert_vedai", "ensure_synthetic_dataset", "load_dataset_yaml", "parse_label_file"]

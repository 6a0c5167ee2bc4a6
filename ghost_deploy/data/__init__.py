"""Data stage: dataset YAMLs, RGB/IR loading, augmentation, the embedded synthetic set, VEDAI conversion."""
from ghost_deploy.data.dataset import DataWarning, Dataset, DatasetSpec, collate, load_dataset_yaml, make_loader, parse_label_file
from ghost_deploy.data.synth import ensure_synthetic_dataset
from ghost_deploy.data.vedai import convert_vedai

__all__ = [
    "DataWarning", "Dataset", "DatasetSpec", "collate", "convert_vedai", "ensure_synthetic_dataset",
    "load_dataset_yaml", "make_loader", "parse_label_file",
]

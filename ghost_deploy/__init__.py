"""ghost-deploy: GHOST mixed-precision detectors for RGB+IR imagery, from training to TensorRT engines."""
__version__ = "0.5.0"


def build_model(name: str, nc: int = 8, input_mode: str = "rgb+ir", sr: bool = False):
    """Build a detector by config name; see `ghost_deploy.model.build_model`."""
    from ghost_deploy.model import build_model as _build

    return _build(name, nc=nc, input_mode=input_mode, sr=sr)


__all__ = ["build_model", "__version__"]

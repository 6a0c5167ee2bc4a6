from ghost_deploy.model.configs import CONFIGS, ModelConfig, get_config
from ghost_deploy.model.detector import INPUT_MODES, Detect, Detector, build_model

__all__ = ["CONFIGS", "ModelConfig", "get_config", "INPUT_MODES", "Detect", "Detector", "build_model"]

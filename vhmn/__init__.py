"""vhmn: Vision Hopfield Memory Networks — reference implementation of the V-HMN book."""
from . import functional
from .memory import EpisodicMemory, HopfieldRetrieval, LearnedMemory
from .model import VHMN, HMNBlock, VHMNConfig
from .registry import create_model, list_models, register_model

__version__ = "0.1.0"
__all__ = [
    "functional", "EpisodicMemory", "LearnedMemory", "HopfieldRetrieval", "VHMN", "VHMNConfig", "HMNBlock",
    "create_model", "list_models", "register_model", "__version__",
]

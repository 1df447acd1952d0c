"""Model builders: one readable decoder, switched by typed `ModelConfig` flags."""
from lab.models.decoder import Decoder, build_empty, build_model

__all__ = ["Decoder", "build_empty", "build_model"]

"""llamapro: exact LLaMA Pro block expansion for Hugging Face safetensors checkpoints."""

__version__ = "0.1.0"

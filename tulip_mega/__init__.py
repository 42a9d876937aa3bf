"""tulip-mega: TULIP vision-language pretraining on megatron-core."""

__version__ = "0.1.0"

"""Checkpoint conversion between our megatron dist checkpoints and external formats.

One module per format, each with both directions: `plain` (plain PyTorch safetensors with
Hugging Face SigLIP names), `hf` (`transformers.SiglipModel` folders), `openclip` (open_clip hub
folders); `common` holds the error type and the run-config and recipe checks they share.
`plain_model` is the pure-PyTorch model a plain export loads into; `pretrained` starts a
training run from HF or open_clip weights. Resharding a checkpoint for another TP x PP layout
is tulip_mega/training/reshard.py (it builds the model and optimizer like the trainer).

The package imports none of them, and megatron-core is imported only where a dist checkpoint
is read, so the plain model and the format mappings run without it.
"""

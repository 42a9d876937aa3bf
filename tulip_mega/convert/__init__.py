"""Checkpoint conversion: megatron dist checkpoints <-> plain PyTorch / Hugging Face SigLIP.

- `plain_model`: a small pure-PyTorch TULIP model (no megatron import) with Hugging Face
  SigLIP parameter names, loadable from `model.safetensors` + `config.json`.
- `megatron_to_plain`: dist checkpoint (any TP/PP) -> plain safetensors, tensor by tensor.
- `hf`: export to / import from `transformers.SiglipModel` directories.
- resharding a checkpoint for another TP x PP layout is tulip_mega/training/reshard.py (it builds the
  model and optimizer like the trainer).

Only `plain_model` is imported here, so `import tulip_mega.convert` stays megatron-free.
"""

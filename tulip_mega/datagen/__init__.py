"""Offline data generation: synthetic datasets (shapes, scenes) and GeCo's generative
augmentation stages (LLM paraphrases and negatives, diffusion image edits).

Run before training by `tulip-mega data synth` and `tulip-mega geco`; nothing here runs
inside a training step. Run-time loading lives in `tulip_mega.data`.
"""

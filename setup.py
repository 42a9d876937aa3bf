"""tulip-mega: TULIP / SigLIP / CLIP pretraining on megatron-core (TP x PP x DP)."""
from setuptools import find_packages, setup

setup(
    name="tulip-mega",
    version="0.1.0",
    description="TULIP vision-language pretraining with megatron-core tensor/pipeline parallelism",
    python_requires=">=3.10",
    packages=find_packages(include=["tulip_mega", "tulip_mega.*"]),
    package_data={"": ["*.yaml", "*.txt"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        "pyyaml>=6",
        "numpy",
        "pillow",
        "safetensors",
        "matplotlib",  # tulip-mega report (PNG curves) and data inspect (image grids)
        "psutil",  # megatron dist_checkpointing writer needs it
        "tqdm",  # geco progress bars (samples/s)
        # Dataset description (`data prepare`, energon folders as train_shards, MetadatasetV2 blends); the
        # training read path stays ours (docs/training.md). energon asks for torch unpinned: the pin above holds.
        "megatron-energon==7.4.1",
        "multi-storage-client==1.3.1",  # energon's storage layer (object stores), pinned with it
    ],
    extras_require={
        # Never needed on CPU. TE needs the CUDA toolkit + cuDNN to build/import.
        "gpu": ["transformer-engine[pytorch]", "nvidia-dali-cuda120>=2.4"],
        # DALI loader (decode + all views, GeCo, EDA); its CPU pipelines run without a GPU.
        "dali": ["nvidia-dali-cuda120>=2.4"],
        # tulip-mega geco text (an HF causal LM) and geco image (a diffusers instruction editor).
        "geco": ["transformers>=4.49", "diffusers>=0.30"],
        # logging.wandb (Weights & Biases); a recipe asking for it without this extra fails at start.
        "wandb": ["wandb>=0.17"],
        # transformers: convert tests (SiglipTextConfig.projection_size) and geco; diffusers: geco image tests;
        # open_clip_torch + timm: convert --to open_clip tests; wandb: logging.wandb tests; scikit-learn: the
        # reference logistic regression of the linear-probe tests; clip-benchmark: `clip_benchmark eval` on the
        # open_clip export (adds webdataset, braceexpand, pycocoevalcap, pycocotools; torch stays the pinned one);
        # moto[server]: a local S3 endpoint for the object-store tests.
        "dev": ["pytest>=7", "pytest-timeout", "transformers>=4.49", "diffusers>=0.30", "open_clip_torch>=3.0",
                "timm>=1.0.15", "wandb>=0.17", "scikit-learn", "clip-benchmark>=1.6.2", "moto[server]==5.2.6"],
    },
    entry_points={"console_scripts": ["tulip-mega=tulip_mega.cli:main"]},
)

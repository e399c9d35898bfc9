"""mdt-ds: MDTv2 (Masked Diffusion Transformer v2) training at scale with DeepSpeed.

Importing the package is cheap on purpose: submodules pull in torch, deepspeed, etc.
"""

__version__ = "0.1.0"

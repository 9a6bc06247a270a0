"""Custom torch ops (``torch.library``) of the package, under the ``nextrec_fast`` namespace.

Each op module registers its ops on import and says whether its backend is usable here:
- ``pooled_embedding``: C++/CUDA multi-feature embedding pooling (``csrc/``).
- ``triton_ops``: Triton expert-linear, BatchNorm and gate-mixture kernels (``kernels/``).
"""

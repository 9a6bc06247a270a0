"""Triton kernels (installed as ``nextrec_fast.kernels``). They know nothing of nextrec."""

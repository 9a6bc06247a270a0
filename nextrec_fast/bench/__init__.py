"""Tooling, apart from the core: ``nextrec-fast bench`` (models.py: reference vs fast models;
pooling.py: the embedding pooling alone; nextrec_fit.py: nextrec's own fit, plain vs
accelerated), ``profile`` (profiling.py), ``plot`` (plotting.py); common.py holds what they share."""

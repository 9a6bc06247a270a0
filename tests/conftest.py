import os

# The Triton kernels run on the CPU through the interpreter; this must be set before any
# kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

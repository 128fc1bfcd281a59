"""Triton kernels and launchers (``bn_act``) and their ahead-of-time compile check (``aot``).

Importing this package does not import triton; ``resfused.triton.bn_act`` does.
"""

"""Triton kernels of exposure-slot, installed as ``exposure_slot.kernels``.

Empty until the Triton backend lands; the package exists so that the install
layout (a top-level ``kernels/`` folder mapped into the package) is fixed now.
"""

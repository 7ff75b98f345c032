"""Numerics of scipion-gsplat (numpy / torch / scipy); never imports pyworkflow or pwem.

Modules: ``geometry`` (conventions), ``symmetry``, ``io`` (STAR/MRC), ``ctf``,
``fourier`` (projection), ``reconstruct`` (Fourier reconstruction), ``fsc``,
``masks``, ``structure`` (PDB/mmCIF → maps, two-state edits), ``simulate``.
"""

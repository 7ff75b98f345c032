"""Gaussian-splat reconstruction (seeds 000/001, DESIGN.md §4).

Modules: ``model`` (Gaussian models: files, maps, PDB/mmCIF export, from
structures), ``render`` (analytic projections with origins and CTF), ``parameters``
(trainable parameterisation), ``data`` (particles for fitting), ``init`` (initial
models), ``fit`` (Adam fitting), ``densify`` (split/clone/prune), ``reconstruct``
(gold-standard half sets → maps and FSC), ``metrics`` (centre RMSD), ``plots``
(FSC, loss and model figures).
"""
from .model import GaussianModel, from_structure  # noqa: F401

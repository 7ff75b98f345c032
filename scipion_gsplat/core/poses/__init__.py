"""Local pose refinement, shared by every method (split volume, Gaussian splat,
heterogeneity).

* :mod:`.rotations` — small rotations as rotation vectors, local grids, the
  composition convention (a correction acts in the image frame:
  ``A' = exp([ω]×)·A``) and pose-error figures;
* :mod:`.local_search` — search on a local grid of rotations and shifts
  against a voxel map in Fourier space (CTF, noise spectrum, Gaussian prior),
  best pose or posterior expectation;
* :mod:`.gradient` — per-particle pose corrections optimised by gradient
  descent together with a differentiable model (the Gaussian renderer).
"""

"""GMM heterogeneity (after Chen & Ludtke): per-particle deformations of a Gaussian model.

A consensus Gaussian model is deformed per particle along a few eigen-motions,
``μ_b = μ + Σ_k z_bk·V_k`` (and optionally ``log a_b = log a + Σ_k z_bk·W_k``);
the motions come from a PCA of per-particle gradients of the data-fit loss, the
coordinates ``z`` from a few Gauss-Newton steps per particle, and model, motions
and coordinates are refined alternately. Modules:

* :mod:`.motion_model`  the deformable model (parameters, rendering, files);
* :mod:`.gradients`     per-particle gradients and their PCA (initial motions);
* :mod:`.coordinates`   Gauss-Newton coordinates along the motions;
* :mod:`.refine`        refit of model and motions with coordinates fixed;
* :mod:`.poses`         pose refinement against the consensus (before the gradients);
* :mod:`.analysis`      frames along a motion (maps, trajectories), subsets;
* :mod:`.selection`     particles inside a lasso/rectangle drawn on two coordinates;
* :mod:`.pipeline`      the whole run, resumable.
"""

"""scipion-gsplat: a Scipion 3 plugin for split-volume 3D classification,
Gaussian-splat reconstruction and GMM heterogeneity analysis.

The numerics live in :mod:`scipion_gsplat.core` (no Scipion import) and run in the
``gsplat_*`` programs; protocols only convert inputs, call a program and register
its outputs.
"""
__version__ = "0.1.0"
# Papers are cited by the protocols that implement them (their ``_references``),
# so a run's Methods tab lists only what it used.
_references = []


def __getattr__(name):
    """Scipion reads ``Plugin`` from this module; import it (and pwem) only then,
    so that the numerics and the programs start without loading Scipion."""
    if name == "Plugin":
        from .plugin import Plugin
        return Plugin
    raise AttributeError(f"module 'scipion_gsplat' has no attribute {name!r}")

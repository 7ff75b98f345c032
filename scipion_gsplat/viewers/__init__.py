"""scipion-gsplat viewers."""

# -*- coding: utf-8 -*-
"""
@techreport{Drager2024splat,
author = {Dr\"ager, Nikolaus},
title = {3D Gaussian Splatting for Volume Reconstruction in Cryo-EM},
institution = {ICME, Stanford University},
year = {2024},
note = {Seed 000/001 of scipion-gsplat}
}

@mastersthesis{Lauzirika2024splitvolume,
author = {Lauzirika Zarrabeitia, Oier},
title = {Development of novel 3D classification methods for Cryo-Electron Microscopy},
school = {Universidad Polit\'ecnica de Madrid},
year = {2024},
note = {Seed 003 of scipion-gsplat: split-volume graph classification}
}

@misc{Chen2018gmm,
author = {Chen, Muyuan},
title = {A machine learning method for resolving heterogeneity in CryoEM single particle reconstruction},
year = {2018},
note = {Seed 004 of scipion-gsplat: Gaussian-mixture heterogeneity analysis}
}

@article{Chen2021gmm,
author = {Chen, Muyuan and Ludtke, Steven J.},
title = {Deep learning-based mixed-dimensional Gaussian mixture model for characterizing variability in cryo-EM},
journal = {Nature Methods},
volume = {18},
pages = {930--936},
year = {2021},
doi = {10.1038/s41592-021-01220-5}
}

@misc{CryoSPIRE,
title = {CryoSPIRE: Reconstructing Heterogeneous Biomolecules via Hierarchical Gaussian Mixtures and Part Discovery},
note = {Seed 002 of scipion-gsplat (poster)}
}
"""

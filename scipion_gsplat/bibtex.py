# -*- coding: utf-8 -*-
"""
@techreport{Drager2024splat,
author = {Dräger, Nikolaus},
title = {3D Gaussian Splatting for Volume Reconstruction in Cryo-EM},
institution = {Institute for Computational and Mathematical Engineering (ICME), Stanford University},
journal = {Technical report, ICME, Stanford University},
year = {2024}
}

@mastersthesis{Lauzirika2024splitvolume,
author = {Lauzirika Zarrabeitia, Oier},
title = {Development of novel 3D classification methods for Cryo-Electron Microscopy},
school = {Universidad Politécnica de Madrid},
journal = {Master's thesis, Universidad Politécnica de Madrid},
year = {2024}
}

@article{Chen2021gmm,
author = {Chen, Muyuan and Ludtke, Steven J.},
title = {Deep learning-based mixed-dimensional Gaussian mixture model for characterizing variability in cryo-EM},
journal = {Nature Methods},
volume = {18},
pages = {930--936},
year = {2021},
doi = {https://doi.org/10.1038/s41592-021-01220-5}
}

@article{Shekarforoush2025cryospire,
author = {Shekarforoush, Shayan and Lindell, David B. and Brubaker, Marcus A. and Fleet, David J.},
title = {CryoSPIRE: Reconstructing Heterogeneous Biomolecules via Hierarchical Gaussian Mixtures and Part Discovery},
journal = {arXiv preprint arXiv:2506.09063},
year = {2025},
url = {https://arxiv.org/abs/2506.09063}
}
"""

"""scipion-em-gsplat: split-volume classification, Gaussian-splat reconstruction and
GMM heterogeneity for Scipion 3."""
from setuptools import find_packages, setup

PROGRAMS = ["simulate", "reconstruct_fourier", "aligned_2d_classification", "graph_max_cut", "refine_classes",
            "project", "reconstruct_splat", "gmm_heterogeneity", "cs2star", "star2cs", "refine_poses"]

setup(
    name="scipion-em-gsplat",
    version="0.1.0",
    description="Scipion plugin: split-volume 3D classification, Gaussian-splat reconstruction, "
                "GMM heterogeneity",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="GPLv3",
    python_requires=">=3.8",
    # The standalone programs live in the top-level programs/ folder of the source
    # tree and are installed as the subpackage scipion_gsplat.programs (no
    # top-level 'programs' module lands in site-packages).
    packages=find_packages(include=["scipion_gsplat", "scipion_gsplat.*"]) + ["scipion_gsplat.programs"],
    package_dir={"scipion_gsplat.programs": "programs"},
    package_data={"scipion_gsplat": ["protocols.conf", "*.png"]},
    install_requires=[
        "scipion-pyworkflow>=3.11",
        "scipion-em>=3.11",
        "numpy",
        "scipy",
        "torch>=2.1,<3",
        "scikit-learn",
        "threadpoolctl",  # --threads also limits numpy's BLAS and OpenMP pools
        "cvxpy",
        "matplotlib",
        "pandas",
        "starfile>=0.5",
        "mrcfile>=1.4",
        "gemmi>=0.6",
        "torch-fourier-slice>=0.6",
        "torch-ctf>=0.6",  # imported by torch-fourier-slice 0.6 without being declared
        "cryosparc-tools==5.0.3",  # .cs particle files (gsplat_cs2star / gsplat_star2cs)
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={
        "pyworkflow.plugin": ["scipion_gsplat = scipion_gsplat"],
        "console_scripts": [f"gsplat_{p} = scipion_gsplat.programs.{p}:run" for p in PROGRAMS],
    },
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering"],
)

"""scipion-gsplat protocols."""
from .protocol_import_particles import ProtGsplatImportParticlesStar
from .protocol_reconstruct_fourier import ProtGsplatReconstructFourier

"""scipion-gsplat protocols."""
from .protocol_import_particles import ProtGsplatImportParticlesStar
from .protocol_reconstruct_fourier import ProtGsplatReconstructFourier
from .protocol_reconstruct_splat import ProtGsplatReconstructSplat
from .protocol_split_volume import ProtGsplatSplitVolume

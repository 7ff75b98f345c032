"""scipion-gsplat viewers."""
from .viewer_splat import GsplatSplatViewer
from .viewer_split_volume import GsplatSplitVolumeViewer
from .viewer_heterogeneity import GsplatHeterogeneityViewer

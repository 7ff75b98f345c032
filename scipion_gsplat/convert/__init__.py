"""Conversions between Scipion objects and the programs' STAR/MRC files."""
from .alignment import matrix_to_relion, relion_to_matrix
from .particles import rows_by_image_id, set_to_star, star_to_set
from .classes import is_classes, iter_particles, particle_class, particles_of, set_particle_class, size_of
from .optics import OpticsGrouper, optics_from_string, optics_to_string

"""Class labels of Scipion particles, whichever protocol made them.

Scipion's own form of a class label is the particle's class id
(``Particle.getClassId()``), set by every classification protocol on the items
of its SetOfClasses; RELION-derived sets also carry ``_rlnClassNumber``. A
particle handed from one classification to the next keeps the old
``_rlnClassNumber`` while its class id is the new one, so the class id wins.
An input may be a SetOfParticles or a SetOfClasses (2D/3D): the class of each
item is then the class it sits in.
"""
from __future__ import annotations

from typing import Iterator, Optional

from ..constants import ATTR_CLASS_NUMBER, ATTR_CLASS_PROB

ATTR_RELION_PROB = "_rlnMaxValueProbDistribution"  # RELION's probability of the assigned class


def is_classes(obj) -> bool:
    """True for a SetOfClasses (2D, 3D, …)."""
    from pwem.objects import SetOfClasses
    return isinstance(obj, SetOfClasses)


def particles_of(obj):
    """The SetOfParticles behind ``obj`` (itself, or the images of a SetOfClasses):
    sampling rate, acquisition, alignment and CTF flags come from it."""
    return obj.getImages() if is_classes(obj) else obj


def particle_class(part) -> Optional[int]:
    """Class label of one particle: its Scipion class id when set (> 0), else
    its ``_rlnClassNumber``, else None."""
    cid = part.getClassId() if hasattr(part, "getClassId") else None
    if cid is not None and int(cid) > 0:
        return int(cid)
    value = part.getAttributeValue(ATTR_CLASS_NUMBER, None)
    return None if value is None else int(value)


def iter_particles(obj) -> Iterator:
    """Every particle of a SetOfParticles (by id) or of a SetOfClasses (class by
    class, each with its class id set to its class). Items are reused by
    Scipion's iterators: use each before asking for the next."""
    if not is_classes(obj):
        yield from obj.iterItems(orderBy="id")
        return
    for cls in obj.iterItems(orderBy="id"):
        k = int(cls.getObjId())
        for part in cls.iterItems(orderBy="id"):
            part.setClassId(k)
            yield part


def size_of(obj) -> int:
    """Number of particles of a SetOfParticles or of all classes of a SetOfClasses."""
    if not is_classes(obj):
        return obj.getSize()
    return sum(cls.getSize() for cls in obj.iterItems())


def set_particle_class(part, label: int, probability: Optional[float] = None) -> None:
    """Give ``part`` the class ``label`` in every form other plugins read: the
    class id, ``_rlnClassNumber``, and ``_rlnClassNumber`` on its Coordinate (the
    only place scipion-em-relion's STAR writer takes rlnClassNumber from, e.g.
    for ``relion_reconstruct --class``); ``probability`` (of the assigned
    class, 0–1) as ``_rlnMaxValueProbDistribution`` and ``_gsplatClassProbability``."""
    from pyworkflow.object import Float, Integer
    part.setClassId(int(label))
    setattr(part, ATTR_CLASS_NUMBER, Integer(int(label)))
    coord = part.getCoordinate() if hasattr(part, "getCoordinate") else None
    if coord is not None:
        setattr(coord, ATTR_CLASS_NUMBER, Integer(int(label)))
    if probability is not None:
        setattr(part, ATTR_RELION_PROB, Float(float(probability)))
        setattr(part, ATTR_CLASS_PROB, Float(float(probability)))

"""Comparing Gaussian models: centre RMSD after matching and superposition."""
from __future__ import annotations

import numpy as np


def kabsch(mobile: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation ``R (3, 3)`` and translation ``t (3,)`` minimising
    ``Σ |R·mobile_i + t − target_i|²`` (proper rotation, no reflection)."""
    mc, tc = mobile.mean(0), target.mean(0)
    h = (mobile - mc).T @ (target - tc)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, tc - r @ mc


def match_centres(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one assignment between two point sets minimising the summed squared
    distance (Hungarian algorithm); ``(rows_a, rows_b)`` of the matched pairs
    (``min(len(a), len(b))`` of them)."""
    from scipy.optimize import linear_sum_assignment
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return linear_sum_assignment(cost)


def centre_rmsd(fitted: np.ndarray, truth: np.ndarray, matching: str = "hungarian",
                superpose: bool = False) -> float:
    """RMSD (Å) between two sets of centres ``(N, 3)``.

    Args:
        matching: ``index`` (row i ↔ row i, needs equal sizes) or ``hungarian``
            (optimal one-to-one assignment, so Gaussians that swapped places or
            models of different origin can be compared).
        superpose: first superpose ``fitted`` on ``truth`` (rigid, Kabsch) using the
            matched pairs (iterated with the assignment when matching).
    """
    a, b = np.asarray(fitted, float), np.asarray(truth, float)
    if matching == "index":
        if len(a) != len(b):
            raise ValueError("index matching needs models of equal size")
        ia = ib = np.arange(len(a))
    elif matching == "hungarian":
        ia, ib = match_centres(a, b)
    else:
        raise ValueError(f"unknown matching '{matching}'")
    if superpose:
        for _ in range(3 if matching == "hungarian" else 1):
            r, t = kabsch(a[ia], b[ib])
            a = a @ r.T + t
            if matching == "hungarian":
                ia, ib = match_centres(a, b)
    return float(np.sqrt(((a[ia] - b[ib]) ** 2).sum(1).mean()))

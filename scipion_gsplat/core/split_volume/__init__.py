"""Split-volume 3D classification (after Lauzirika Zarrabeitia, extended).

``directions`` (direction grid, cones, equivalent poses) → ``align`` (prepared
images, in-plane alignment) → ``classify2d`` (masked PCA + GMM per direction)
→ ``maxcut`` (direction graph, sign synchronisation) → ``partition`` (class per
particle). ``pooled`` (3D eigenvolume detector) and ``refine`` (two-class 3D
refinement with fixed poses) pool the evidence in 3D.
"""

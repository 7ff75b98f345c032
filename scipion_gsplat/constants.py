"""Names shared by the plugin's protocols and viewers."""

# Environment variables read by the Plugin (all optional).
GSPLAT_DEVICE = "GSPLAT_DEVICE"      # default --device of the programs (auto, cpu, cuda)
GSPLAT_BIN = "GSPLAT_BIN"            # folder holding the gsplat_* programs, if not next to python

# Per-particle attributes the plugin writes on Scipion particles.
ATTR_RANDOM_SUBSET = "_rlnRandomSubset"
ATTR_CLASS_NUMBER = "_rlnClassNumber"
ATTR_CLASS_PROB = "_gsplatClassProbability"   # probability of the assigned class
ATTR_SCORE = "_gsplatScore"                   # log-odds of class 1 vs class 2 (split volume)
ATTR_COORDINATE = "_gsplatCoordinate{}"       # coordinate along eigen-motion k (GMM heterogeneity), Å
ATTR_ANGLE_CHANGE = "_gsplatAngleChange"      # rotation of a refined pose from the input pose, degrees
ATTR_ANGULAR_SD = "_gsplatAngularSD"          # posterior SD of a refined rotation, degrees per axis
ATTR_SHIFT_SD = "_gsplatShiftSD"              # posterior SD of a refined origin, pixels per axis

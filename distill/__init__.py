"""depthkd offline toolchain: distil transformer depth teachers into CNN students, evaluate, export."""

__version__ = "0.1.0"

"""goldfish_ds: the goldfish loss (Hans et al. 2024, arXiv 2406.10209) with compiled CPU/CUDA kernels."""
from goldfish_ds.config import STRATEGIES, GoldfishConfig
from goldfish_ds.kernels import compiled_backends, cpu_capability
from goldfish_ds.linear_cross_entropy import goldfish_linear_cross_entropy
from goldfish_ds.loss import GoldfishStats, goldfish_cross_entropy
from goldfish_ds.mask import apply_goldfish, goldfish_mask

__all__ = [
    "GoldfishConfig",
    "GoldfishStats",
    "STRATEGIES",
    "apply_goldfish",
    "compiled_backends",
    "cpu_capability",
    "goldfish_cross_entropy",
    "goldfish_linear_cross_entropy",
    "goldfish_mask",
]
__version__ = "0.1.0"

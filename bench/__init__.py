"""Benchmarks of issue 9: every hot path of the fake kernel and vfio_impl as a ratio against a
raw baseline measured in the same run (`python3 -m bench`)."""

from .iommu import figure_5, figure_6
from .ioctl import figure_2
from .irq import figure_1
from .ivshmem import figure_7
from .region import figure_3, figure_4
from .suite import figure_8
from .vm import figure_9

FIGURES = {"1": figure_1, "2": figure_2, "3": figure_3, "4": figure_4, "5": figure_5, "6": figure_6,
           "7": figure_7, "8": figure_8, "9": figure_9}

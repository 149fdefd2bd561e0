"""A userspace VFIO driver library, testable against real or fake kernels."""

"""The VFIO conformance suite: the same tests on the fake kernel and on a real one."""

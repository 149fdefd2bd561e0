"""The PCI device emulation QEMU keeps in hw/pci (config writes, BARs, MSI-X), shared by the
vfio-pci flavour, the ivshmem device model and the fake kernel's PCI functions."""

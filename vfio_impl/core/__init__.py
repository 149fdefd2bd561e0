"""The VFIO library core, what every bus shares (QEMU's hw/vfio common code): the Host boundary,
errors and trace events, the IOMMU backends (type1 through a group and a container), devices,
regions and IRQ signalling."""

"""The bus flavours, one file each as QEMU's hw/vfio has them: vfio-pci, vfio-platform and vfio-ccw.
Each gets its device through core.device.Device.attach and adds only what its bus needs."""

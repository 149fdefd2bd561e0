"""The VMM side a passed-through device meets: the machine (event loop, clock, guest RAM, IRQ
lines), the s390 channel subsystem, and QEMU's ivshmem device model."""

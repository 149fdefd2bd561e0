"""QEMU's ivshmem wire protocol (sans-I/O), and the ivshmem-server and ivshmem-client tools on it."""

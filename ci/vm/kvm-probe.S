/* The KVM probe guest of ci/real-vm.sh (see probe_guest in ci/vm/lib.sh).
 *
 * On some hosts QEMU starts a "-cpu host" KVM VM, yet a real guest dies on the
 * kernel's first `lock cmpxchg16b` with "KVM internal error. Suberror: 1"
 * (emulation failure), a minute into its boot. This guest does what that
 * kernel does, in a few instructions: enter 64-bit mode, run
 * `lock cmpxchg16b` on ordinary memory, then write 42 to QEMU's
 * isa-debug-exit port, which ends QEMU with status (42 << 1) | 1 = 85.
 *
 * Built with `as --32` and `ld -m elf_i386 -n -Ttext=0x100000`: a Multiboot
 * ELF, which QEMU's -kernel starts in 32-bit protected mode with paging off.
 */
        .set MB_MAGIC, 0x1BADB002
        .set DEBUG_EXIT_PORT, 0xf4      /* -device isa-debug-exit,iobase=0xf4 */
        .set EXIT_VALUE, 42

        .text
        .code32
        .align 4
        .long MB_MAGIC, 0, -MB_MAGIC    /* Multiboot header: magic, flags, checksum */

        .globl _start
_start:
        lgdt gdt_ptr
        mov $slot, %esi                 /* the cmpxchg16b operand, for later */
        mov $pml4, %eax                 /* identity-map the first 2 MiB */
        mov %eax, %cr3
        mov %cr4, %eax
        or $0x20, %eax                  /* CR4.PAE */
        mov %eax, %cr4
        mov $0xC0000080, %ecx           /* EFER */
        rdmsr
        or $0x100, %eax                 /* EFER.LME */
        wrmsr
        mov %cr0, %eax
        or $0x80000001, %eax            /* CR0.PG | CR0.PE */
        mov %eax, %cr0
        ljmp $0x08, $long_mode          /* into the 64-bit code segment */

        .code64
long_mode:
        xor %eax, %eax                  /* compare RDX:RAX = 0 ... */
        xor %edx, %edx
        mov $1, %ebx                    /* ... and store RCX:RBX = 1 */
        xor %ecx, %ecx
        lock cmpxchg16b (%rsi)
        mov $EXIT_VALUE, %al
        out %al, $DEBUG_EXIT_PORT
1:      hlt
        jmp 1b

        .data
        .align 16
gdt:    .quad 0
        .quad 0x00209a0000000000        /* 0x08: present, ring 0, code, 64-bit */
gdt_ptr:
        .word gdt_ptr - gdt - 1
        .long gdt
        .align 16
slot:   .quad 0, 0

        .align 4096                     /* page tables: 2 MiB page at 0, present + writable */
pml4:   .long pdpt + 3, 0
        .fill 511, 8, 0
pdpt:   .long pd + 3, 0
        .fill 511, 8, 0
pd:     .long 0x83, 0                   /* + page size */
        .fill 511, 8, 0

/* Entry of a bare leanvm guest: long mode, CPL 0, stack set by the VMM.
 * rdi = boot info, rsi = argument string, rdx = its length (docs/guest-abi.md).
 * main's return value is written to the exit port (0xf4), which ends the VM. */
    .section .text.start, "ax"
    .globl _start
_start:
    call main
    mov $0xf4, %dx
    outl %eax, %dx
1:  cli
    hlt
    jmp 1b

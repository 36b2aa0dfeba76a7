/* _start for the static test programs: hand main the initial stack (argc, argv...), keep the
 * ABI's 16-byte stack alignment, and exit with main's result through int 0x80. */
    .text
    .globl _start
_start:
    xor %ebp, %ebp
    mov %rsp, %rdi            /* argc at (%rdi), argv from 8(%rdi) */
    and $-16, %rsp
    call start_main
    mov %eax, %ebx            /* exit(status) */
    mov $1, %eax
    int $0x80
    hlt                       /* not reached: a fault ends the process */
    .section .note.GNU-stack, "", @progbits

/* Reset vector and the switch to 32-bit protected mode, shared by the tiny firmware
 * programs. The CPU starts in real mode at CS:IP = F000:FFF0 with CS base 0xFFFF0000, so
 * the image's last 64 KiB are addressable through CS without touching segment registers;
 * the entry loads a flat GDT from there (32-bit operand: the whole base), sets CR0.PE and
 * jumps to 32-bit code anywhere in the image. main (of the program) runs with a stack in
 * conventional RAM; its return value in %al is written to the exit port.
 *
 * Helpers for the programs: putc (%al), puts (%esi: NUL-terminated), exit_vm (%al: status),
 * halt_forever.
 */
#include "firmware.h"

    .section .reset16, "ax"
    .code16
reset_block:                                  /* linked at RESET_BLOCK */
#define RM(sym) ((sym) - reset_block + (RESET_BLOCK - FW_CS_BASE))  /* offset from CS base */
start16:
    cli
    cld
    lgdtl %cs:RM(gdt_pointer)
    movl %cr0, %eax
    orl $1, %eax                              /* CR0.PE */
    movl %eax, %cr0
    ljmpl $CODE_SEL, $start32

    .balign 8
gdt:
    .quad 0                                   /* null descriptor */
    .quad 0x00CF9B000000FFFF                  /* 0x08: code, base 0, limit 4 GiB, 32-bit */
    .quad 0x00CF93000000FFFF                  /* 0x10: data, base 0, limit 4 GiB, writable */
gdt_end:
gdt_pointer:
    .word gdt_end - gdt - 1
    .long RESET_BLOCK + (gdt - reset_block)   /* linear address of the GDT */

    .org FW_PARAMS - RESET_BLOCK, 0xff
params:                                       /* filled in by the builder */
    .ascii "LVTF"
    .long 0                                   /* count */
    .long 0                                   /* checksum */
    .long 0

    .org 0xFFFFFFF0 - RESET_BLOCK, 0xff
    .globl reset_vector
reset_vector:                                 /* F000:FFF0, the first instruction */
    jmp start16
    .org 0x100, 0xff

    .text
    .code32
start32:
    movw $DATA_SEL, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $STACK_TOP, %esp
    call main
    /* fall through: main's status in %al */
    .globl exit_vm
exit_vm:
    outb %al, $EXIT_PORT
    /* a VMM without an exit device lands here */
    .globl halt_forever
halt_forever:
    cli
    hlt
    jmp halt_forever

    .globl putc
putc:                                         /* %al to COM1, waiting for room */
    pushl %edx
    pushl %eax
    movw $COM1_LSR, %dx
1:  inb %dx, %al
    testb $LSR_THRE, %al
    jz 1b
    popl %eax
    movw $COM1, %dx
    outb %al, %dx
    popl %edx
    ret

    .globl puts
puts:                                         /* the NUL-terminated string at %esi */
    pushl %eax
1:  lodsb
    testb %al, %al
    jz 2f
    call putc
    jmp 1b
2:  popl %eax
    ret

/* outloop: COUNT writes to port 0x80 (each one a vCPU exit to the VMM), then status 0 to
 * the exit port. COUNT is read from the parameter block, which the builder patches per
 * run size, so one build serves every N. */
#include "firmware.h"

    .text
    .code32
    .globl main
main:
    movl PARAM_COUNT, %ecx
    testl %ecx, %ecx
    jz 2f
1:  outb %al, $POST_PORT
    decl %ecx
    jnz 1b
2:  xorl %eax, %eax
    ret

/* flashwork: firmware that works its flash as real firmware does, for memory measurements.
 *   1. reads every 32-bit word of the code bank (this image, the FW_SIZE bytes below
 *      4 GiB) and checks that they sum to 0 (the builder sets the checksum word);
 *   2. checks that bank 1 (the vars store, VARS_SIZE bytes directly below bank 0) answers
 *      a CFI query with "QRY", then returns it to read-array mode;
 *   3. programs PROGRAM_WORDS 32-bit words at PROGRAM_OFFSET of bank 1 (0x40, then the
 *      word; read status 0x70: ready 0x80 and no error bits);
 *   4. block-erases the sector at ERASE_OFFSET (0x20, 0xD0; read status again);
 *   5. returns the bank to read-array mode (0xFF) and reads both sectors back;
 *   6. prints "flashwork done" on COM1 and stays alive: cli; hlt in a loop.
 * A failed step prints "flashwork: <what> failed" and writes its step number to the exit
 * port. */
#include "firmware.h"

#define VARS_BASE       (FW_BASE - VARS_SIZE)
#define CFI_QUERY       0x98
#define CFI_READ_ARRAY  0xFF
#define CFI_PROGRAM     0x40
#define CFI_ERASE       0x20
#define CFI_CONFIRM     0xD0
#define CFI_STATUS      0x70
#define STATUS_READY    0x80
#define STATUS_ERRORS   0x3A        /* erase, program, Vpp and locked error bits */
#define SECTOR          4096

    .text
    .code32
    .globl main
main:
    /* 1: read the code bank, every word */
    movl $FW_BASE, %esi
    movl $FW_SIZE / 4, %ecx
    xorl %eax, %eax
1:  addl (%esi), %eax
    addl $4, %esi
    decl %ecx
    jnz 1b
    testl %eax, %eax
    movl $msg_checksum, %esi
    movb $1, %bl
    jnz fail

    /* 2: the vars bank is a CFI flash */
    movl $VARS_BASE, %edi
    movb $CFI_QUERY, (%edi)
    movb 0x10(%edi), %al
    movb 0x11(%edi), %ah
    movb 0x12(%edi), %dl
    movb $CFI_READ_ARRAY, (%edi)
    movl $msg_query, %esi
    movb $2, %bl
    cmpw $('R' << 8 | 'Q'), %ax
    jne fail
    cmpb $'Y', %dl
    jne fail

    /* 3: program words */
    movl $VARS_BASE + PROGRAM_OFFSET, %edi
    movl $program_words, %esi
    movl $PROGRAM_WORDS, %ecx
1:  movl (%esi), %eax
    movb $CFI_PROGRAM, (%edi)
    movl %eax, (%edi)
    addl $4, %esi
    addl $4, %edi
    decl %ecx
    jnz 1b
    movl $msg_program, %esi
    movb $3, %bl
    call check_status

    /* 4: erase a sector */
    movl $VARS_BASE + ERASE_OFFSET, %edi
    movb $CFI_ERASE, (%edi)
    movb $CFI_CONFIRM, (%edi)
    movl $msg_erase, %esi
    movb $4, %bl
    call check_status

    /* 5: back to read-array mode; read what was written */
    movb $CFI_READ_ARRAY, (%edi)
    movl $VARS_BASE + PROGRAM_OFFSET, %edi
    movl $program_words, %esi
    movl $PROGRAM_WORDS, %ecx
    repe cmpsl
    movl $msg_readback, %esi
    movb $5, %bl
    jne fail
    movl $VARS_BASE + ERASE_OFFSET, %edi
    movl $SECTOR / 4, %ecx
    movl $0xFFFFFFFF, %eax
    repe scasl
    jne fail

    /* 6: done; stay up for the host to look at */
    movl $msg_done, %esi
    call puts
    jmp halt_forever

/* Read status at %edi: ready and no error bits, else fail with %esi / %bl. */
check_status:
    movb $CFI_STATUS, (%edi)
    movb (%edi), %al
    andb $STATUS_READY | STATUS_ERRORS, %al
    cmpb $STATUS_READY, %al
    jne fail
    ret

/* Print "flashwork: <%esi> failed" and exit with status %bl. */
fail:
    pushl %esi
    movl $msg_prefix, %esi
    call puts
    popl %esi
    call puts
    movl $msg_failed, %esi
    call puts
    movb %bl, %al
    jmp exit_vm

    .section .rodata
    .balign 4
program_words:
    .ascii PROGRAM_TEXT               /* PROGRAM_WORDS * 4 bytes, from the builder */
msg_prefix:     .asciz "flashwork: "
msg_checksum:   .asciz "code bank checksum"
msg_query:      .asciz "vars bank CFI query"
msg_program:    .asciz "program"
msg_erase:      .asciz "block erase"
msg_readback:   .asciz "read-back"
msg_failed:     .asciz " failed\n"
msg_done:       .asciz "flashwork done\n"

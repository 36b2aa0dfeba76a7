/* Protected-mode entry of leanvm's test kernel, loaded at 1 MiB.
 *
 * startup_32 (offset 0): flat 32-bit protected mode, ESI = boot_params. Builds page tables
 * mapping the first 4 GiB with 2 MiB pages, enters long mode and joins startup_64.
 * startup_64 (offset 0x200): the 64-bit boot protocol entry, RSI = boot_params, paging on.
 * pvh_start: the PVH entry (ELF note Xen/18): 32-bit, paging off, EBX = hvm_start_info;
 * it records EBX and joins startup_32 with no boot_params. */
    .section .text.head, "ax"
    .code32
    .globl startup_32
startup_32:
    cli
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %esp
    mov %esi, boot_params_32
    movl $1, entered_32
    mov $pml4, %edi                   /* clear PML4 and PDPT: RAM need not be zero */
    xor %eax, %eax
    mov $2048, %ecx
    rep stosl
    /* 2048 page-directory entries of 2 MiB: identity for 0..4 GiB */
    mov $page_dirs, %edi
    mov $0x83, %eax                   /* present, writable, 2 MiB page */
    xor %edx, %edx
    mov $2048, %ecx
1:  mov %eax, (%edi)
    mov %edx, 4(%edi)
    add $0x200000, %eax
    adc $0, %edx
    add $8, %edi
    loop 1b
    mov $page_dirs + 3, %eax
    mov %eax, pdpt
    add $0x1000, %eax
    mov %eax, pdpt + 8
    add $0x1000, %eax
    mov %eax, pdpt + 16
    add $0x1000, %eax
    mov %eax, pdpt + 24
    mov $pdpt + 3, %eax
    mov %eax, pml4
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                    /* PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx             /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    lgdt gdt64_ptr
    mov %cr0, %eax
    or $0x80000001, %eax              /* PG | PE */
    mov %eax, %cr0
    ljmp $0x08, $from_32

    .balign 8
gdt64:
    .quad 0
    .quad 0x00af9a000000ffff          /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff          /* 0x10: data */
gdt64_ptr:
    .word 23
    .long gdt64

    .code64
from_32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov boot_params_32(%rip), %esi
    jmp startup_64

    .code32
    .globl pvh_start
pvh_start:
    cli
    mov %ebx, pvh_start_info
    xor %esi, %esi
    jmp startup_32

    .code64
    .org 0x200
    .globl startup_64
startup_64:
    cli
    lea boot_stack_top(%rip), %rsp
    mov %rsi, %rdi
    call kmain
    mov $0xf4, %dx
    outl %eax, %dx
2:  hlt
    jmp 2b

    .section .bss
    .balign 4096
pml4:       .skip 4096
pdpt:       .skip 4096
page_dirs:  .skip 4 * 4096
boot_stack: .skip 16384
boot_stack_top:
boot_params_32: .long 0
    .globl entered_32
entered_32: .long 0
    .globl pvh_start_info
pvh_start_info: .long 0

    /* PVH entry point for loaders that read ELF notes (Xen, Linux's PVH, leanvm) */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18          /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start

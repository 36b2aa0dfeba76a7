/* Real-mode part of leanvm's Linux-shaped test kernel (see README in this directory).
 *
 * The file starts with this code: sector 0 then one more sector, the Linux boot protocol
 * header at 0x1f1 (Documentation/arch/x86/boot.rst, protocol 2.15). A boot loader enters at
 * offset 0x200 in real mode with CS = base/16 + 0x20 and DS = base/16. This code prints a
 * line on COM1, switches to flat 32-bit protected mode and jumps to code32_start with ESI
 * pointing at this block (the header fields sit where struct boot_params has them).
 * build.py patches setup_sects, syssize and init_size after linking. */
    .code16
    .section .setup, "ax"
    .globl _setup
_setup:
    .org 0x1f1
setup_sects:     .byte 0              /* patched */
root_flags:      .word 0
syssize:         .long 0              /* patched: protected-mode size / 16 */
ram_size:        .word 0
vid_mode:        .word 0xffff
root_dev:        .word 0
boot_flag:       .word 0xaa55
    .org 0x200
    .byte 0xeb, start16 - 1f          /* jmp start16 */
1:
    .ascii "HdrS"
version:         .word 0x020f
realmode_swtch:  .long 0
start_sys_seg:   .word 0x1000
kernel_version:  .word version_string - 0x200
type_of_loader:  .byte 0
loadflags:       .byte 0x01           /* LOADED_HIGH */
setup_move_size: .word 0x8000
code32_start:    .long 0x100000
ramdisk_image:   .long 0
ramdisk_size:    .long 0
bootsect_kludge: .long 0
heap_end_ptr:    .word 0
ext_loader_ver:  .byte 0
ext_loader_type: .byte 0
cmd_line_ptr:    .long 0
initrd_addr_max: .long 0x7fffffff
kernel_alignment:.long 0x200000
relocatable:     .byte 0
min_alignment:   .byte 0
xloadflags:      .word 0x0001         /* XLF_KERNEL_64: 64-bit entry at code32_start + 0x200 */
cmdline_size:    .long 2047
hardware_subarch:.long 0
subarch_data:    .quad 0
payload_offset:  .long 0
payload_length:  .long 0
setup_data:      .quad 0
pref_address:    .quad 0x100000
init_size:       .long 0              /* patched */
handover_offset: .long 0
kernel_info:     .long 0

start16:
    cli
    cld
    mov %cs, %ax
    sub $0x20, %ax
    mov %ax, %ds
    mov %ax, %es
    movzwl %ax, %ebx
    shl $4, %ebx                      /* ebx = linear address of this block */
    mov $banner, %si
2:  lodsb
    test %al, %al
    jz 3f
    mov $0x3f8, %dx
    outb %al, %dx
    jmp 2b
3:  lea gdt(%ebx), %eax               /* the GDT's linear address */
    mov %eax, gdtr + 2
    lgdtl gdtr
    mov code32_start, %eax
    mov %eax, farptr
    mov %ebx, %esi                    /* boot_params for the 32-bit entry */
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl *farptr

    .balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff          /* 0x08: flat 32-bit code */
    .quad 0x00cf92000000ffff          /* 0x10: flat data */
gdtr:
    .word 23
    .long 0
farptr:
    .long 0
    .word 0x08
banner:
    .asciz "leanvm-test-kernel: setup\r\n"
version_string:
    .asciz "leanvm-test-kernel 1.0"

/* Constants shared by the tiny firmware's assembly files. FW_SIZE (the image size) and the
   program's own constants come from the builder (tests/guests/build.py) as -D flags. */
#define FW_TOP          0x100000000  /* the image ends at 4 GiB */
#define FW_BASE         (FW_TOP - FW_SIZE)
#define FW_CS_BASE      0xFFFF0000   /* CS base after reset */
#define RESET_BLOCK     0xFFFFFF00   /* the last 256 bytes: real-mode code, GDT, parameters */
#define FW_PARAMS       0xFFFFFFE0   /* parameter block (see build.py FIRMWARE_PARAMS) */
#define PARAM_MAGIC     (FW_PARAMS + 0)   /* "LVTF" */
#define PARAM_COUNT     (FW_PARAMS + 4)   /* outloop: number of port writes */
#define PARAM_CHECKSUM  (FW_PARAMS + 8)   /* makes the image's 32-bit words sum to 0 */

#define CODE_SEL        0x08         /* flat 4 GiB code segment, 32-bit */
#define DATA_SEL        0x10         /* flat 4 GiB data segment */
#define STACK_TOP       0x8000       /* conventional RAM: present in every pc-like machine */

#define COM1            0x3F8
#define COM1_LSR        (COM1 + 5)
#define LSR_THRE        0x20         /* transmit holding register empty */
#define EXIT_PORT       0xF4         /* leanvm's exit port, QEMU's isa-debug-exit */
#define POST_PORT       0x80         /* the POST code port: nothing behind it that matters */

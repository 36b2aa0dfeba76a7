/* A tiny freestanding runtime for bare leanvm guests: port and MMIO access, a polled
 * COM1 console, exit/reset. Everything is static inline: no library to link. */
#ifndef LEANVM_GUEST_RUNTIME_H
#define LEANVM_GUEST_RUNTIME_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

struct leanvm_boot_info {
    u32 magic;        /* 0x424d564c "LVMB" */
    u32 version;      /* 1 */
    u64 ram_size;     /* bytes of guest RAM */
    u64 args_addr;    /* NUL-terminated argument string */
    u64 args_len;
    u64 image_end;    /* first byte after the loaded program */
};

#define COM1 0x3f8
#define EXIT_PORT 0xf4
#define I8042_COMMAND 0x64

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_write64(u64 a, u64 v) { *(volatile u64 *)a = v; }
static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline u64 mmio_read64(u64 a) { return *(volatile u64 *)a; }

static inline void putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20)) /* LSR.THRE */
        ;
    outb(COM1, (u8)c);
}

static inline void puts(const char *s)
{
    while (*s) {
        if (*s == '\n')
            putc('\r');
        putc(*s++);
    }
}

static inline void put_hex(u64 v)
{
    static const char digits[] = "0123456789abcdef";
    puts("0x");
    for (int shift = 60; shift >= 0; shift -= 4)
        putc(digits[(v >> shift) & 0xf]);
}

static inline void put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(&buf[i]);
}

static inline int getc(void) /* blocks until a byte arrives */
{
    while (!(inb(COM1 + 5) & 0x01)) /* LSR.DR */
        ;
    return inb(COM1);
}

static inline __attribute__((noreturn)) void guest_exit(u32 status)
{
    outl(EXIT_PORT, status);
    for (;;) __asm__ volatile("cli; hlt");
}

static inline __attribute__((noreturn)) void reset(void)
{
    while (inb(I8042_COMMAND) & 0x02) /* input buffer full */
        ;
    outb(I8042_COMMAND, 0xfe); /* pulse the reset line */
    for (;;) __asm__ volatile("cli; hlt");
}

static inline u64 parse_hex(const char **s) /* "0x1f 20" -> 0x1f, leaves *s after it */
{
    u64 v = 0;
    while (**s == ' ')
        (*s)++;
    if ((*s)[0] == '0' && (*s)[1] == 'x')
        *s += 2;
    for (;; (*s)++) {
        char c = **s;
        if (c >= '0' && c <= '9') v = v * 16 + (u64)(c - '0');
        else if (c >= 'a' && c <= 'f') v = v * 16 + (u64)(c - 'a' + 10);
        else break;
    }
    return v;
}

static inline int streq(const char *a, const char *b)
{
    while (*a && *a == *b) { a++; b++; }
    return *a == *b;
}

int main(struct leanvm_boot_info *info, const char *args, u64 args_len);

#endif

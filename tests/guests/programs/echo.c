/* Reads COM1 until a newline, echoing each byte upper-cased; exits with the byte count. */
#include "runtime.h"

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    int n = 0;
    puts("ready\n");
    for (;;) {
        int c = getc();
        if (c == '\n')
            break;
        if (c >= 'a' && c <= 'z')
            c -= 'a' - 'A';
        putc((char)c);
        n++;
    }
    putc('\n');
    return n;
}

/* Prints its argument up to '|' exactly as given (no newline added), then exits with the hex
 * status after '|': "[red]x[/x]|0x100" prints "[red]x[/x]" and exits with 0x100. With a
 * leading '@' the text goes to the debug console (port 0x402) with a newline instead. Used
 * to check that guest text is data in leanvm's summary and that any status maps to an exit
 * code. */
#include "runtime.h"

#define DEBUGCON 0x402

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    const char *p = args;
    int debugcon = *p == '@';
    if (debugcon)
        p++;
    while (*p && *p != '|') {
        if (debugcon)
            outb(DEBUGCON, (u8)*p++);
        else
            putc(*p++);
    }
    if (debugcon)
        outb(DEBUGCON, '\n');
    if (*p == '|')
        p++;
    guest_exit((u32)parse_hex(&p));
}

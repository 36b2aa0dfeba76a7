/* Writes its argument to COM1's transmit register without polling the line status (as an
 * interrupt-driven driver fills the FIFO), then halts with interrupts off: it makes no
 * exit after its writes. Used to check that writes KVM queued (coalesced I/O) still reach
 * the console when the guest stops exiting. */
#include "runtime.h"

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    for (const char *p = args; *p; p++)
        outb(COM1, (u8)*p);
    for (;;)
        __asm__ volatile("cli; hlt");
}

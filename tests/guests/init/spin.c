/* leanvm's spinning init: keeps the kernel alive on a host where guest system calls do not
 * work (docs/facts.md#user-mode-cannot-enter-the-kernel). As PID 1 it makes no system call
 * at all and spins in user mode, so the kernel runs on (timers, workqueues, drivers such as
 * virtio-mem answering the host) until the VMM stops the VM. */
#include "sys32.h"

int start_main(long *stack) {
    (void)stack;
    for (;;)
        __asm__ volatile("pause");
}

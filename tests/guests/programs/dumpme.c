/* A guest to dump: a known marker in a global, a page of a known pattern, then a counter
 * that keeps changing ("spin"), a sweep ("sweep": step s writes s into page s mod 512 of
 * an array, then into dump_counter; a dump of one instant where dump_counter is S >= 512
 * holds S - ((S - p) mod 512) in page p, but for page (S + 1) mod 512, which may hold
 * S + 1 already), or a stop at once through the exit port
 * ("exit"). */
#include "runtime.h"

volatile u64 dump_marker = 0;
volatile u64 dump_counter = 0;
volatile u8 dump_pattern[3 * 4096] __attribute__((aligned(4096)));
#define SWEEP_PAGES 512
volatile u64 dump_sweep[SWEEP_PAGES * 512] __attribute__((aligned(4096)));

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    dump_marker = 0x6c65616e766d4455ULL; /* "UDmvnael": "leanvmDU" read little-endian */
    for (u64 i = 0; i < sizeof(dump_pattern); i++)
        dump_pattern[i] = (u8)(i * 7 + 1);
    puts("dump me\n");
    if (streq(args, "exit"))
        return 0;
    if (streq(args, "sweep"))
        for (u64 step = 1;; step++) {
            dump_sweep[(step % SWEEP_PAGES) * 512] = step;
            dump_counter = step;
        }
    for (;;)
        dump_counter++;
}

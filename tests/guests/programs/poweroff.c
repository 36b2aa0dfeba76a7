/* Powers the VM off the way Linux's ACPI code does (ACPI 6.4, 16.1.3 "Sleeping/Wake Control"):
 * write \_S5's SLP_TYP to PM1a_CNT, then SLP_TYP with SLP_EN. Before that it reports PM1a_CNT
 * (SCI_EN must read as 1: the FADT says the platform is always in ACPI mode) and two PM timer
 * readings. Returning (status 2) means the power-off did not happen. */
#include "runtime.h"

#define PM1A_CNT 0x604       /* FADT PM1a_CNT_BLK */
#define PM_TMR 0x608         /* FADT PM_TMR_BLK */
#define SCI_EN 0x0001
#define SLP_TYP_S5 5         /* \_S5 package element 0 in leanvm's DSDT */
#define SLP_TYP_SHIFT 10
#define SLP_EN 0x2000

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    u16 control = inw(PM1A_CNT);
    u32 t1 = inl(PM_TMR);
    for (volatile int i = 0; i < 2000; i++)
        ;
    u32 t2 = inl(PM_TMR);
    puts("pm1a_cnt ");
    put_hex(control);
    puts(" timer ");
    put_dec(t1);
    puts(" ");
    put_dec(t2);
    puts("\n");
    if (!(control & SCI_EN))
        return 1;
    outw(PM1A_CNT, SLP_TYP_S5 << SLP_TYP_SHIFT);
    outw(PM1A_CNT, (SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN);
    puts("still running after S5\n");
    return 2;
}

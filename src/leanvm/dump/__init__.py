"""Guest memory dumps: ELF core files (elf.py) and makedumpfile's kdump-compressed format
(kdump.py), written from a plain DumpSource (source.py) that the machine layer fills in
(machine/dump.py): the populated guest-physical runs, each vCPU's registers and the guest
kernel's VMCOREINFO. Nothing here knows about KVM."""

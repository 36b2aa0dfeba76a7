# leanvm: `make run` boots the bundled demo guest, `make test` runs the whole suite.
# Both install what is missing first (system packages via apt, Python packages in .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast test-nested bench bytecode demo-guest clean

$(STAMP): pyproject.toml scripts/install-deps
	PYTHON=$(PYTHON) scripts/install-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(MAKE) --no-print-directory bytecode
	touch $(STAMP)

# Start-up time depends on cached bytecode; write it even where PYTHONDONTWRITEBYTECODE is set.
bytecode:
	$(PY) -m compileall -q src >/dev/null

run: $(STAMP) bytecode
	$(VENV)/bin/leanvm run

# The whole suite, then the tests that need guest user space again on a real KVM in L1
# where this host's KVM cannot run them (scripts/nested-kvm says why it runs or skips).
# Last, this host's crash and drgn read the dumps of Debian's stock kernel made in L1 (or
# here, on a host whose KVM runs user space), with Debian's debug vmlinux (docs/dump.md).
test: $(STAMP)
	rm -rf $(NESTED_FILES)/stock-dumps
	$(PY) -m pytest -q
	$(PY) scripts/nested-kvm --if-needed --timeout $(NESTED_TIMEOUT) --out $(NESTED_FILES) -- $(NESTED_PYTEST)
	$(STOCK_READERS)

# Tests that need guest user space (-m userspace), in an L1 Linux under QEMU TCG with SVM:
# its kvm_amd is a real KVM (docs/nested.md).
# A test still running after 900 s has every thread's stack dumped (faulthandler_timeout).
# L1 itself has been seen to freeze (docs/nested.md): scripts/nested-kvm sees it and boots
# L1 again, within NESTED_TIMEOUT for all attempts.
NESTED_TIMEOUT ?= 2400
NESTED_PYTEST = $(PY) -m pytest -q -p no:cacheprovider -m userspace -rA -o faulthandler_timeout=900 tests/kvm
NESTED_FILES = build/nested-out
STOCK_READERS = if [ -f $(NESTED_FILES)/stock-dumps/about.json ]; then \
	LEANVM_STOCK_DUMPS=$(NESTED_FILES)/stock-dumps $(PY) -m pytest -q -p no:cacheprovider -rA \
	tests/kvm/test_dump_stock.py -k read; \
	else echo "no stock-kernel dumps were made: their readers did not run"; fi
test-nested: $(STAMP)
	rm -rf $(NESTED_FILES)/stock-dumps
	$(PY) scripts/nested-kvm --timeout $(NESTED_TIMEOUT) --out $(NESTED_FILES) -- $(NESTED_PYTEST)
	$(STOCK_READERS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	scripts/install-deps bench
	$(PY) bench/exit_cost.py
	$(PY) bench/startup.py
	$(PY) bench/flash_memory.py
	$(PY) bench/firmware_boot.py
	$(PY) bench/trace_overhead.py
	$(PY) bench/linux_boot.py
	$(PY) bench/nested_boot.py --in-l1
	$(PY) bench/virtio_mem.py --in-l1
	$(PY) bench/dump.py
	$(PY) bench/qmp.py

# Rebuild the bundled demo guest from tests/guests/programs/demo.c.
demo-guest: $(STAMP)
	$(PY) tests/guests/build.py demo --out src/leanvm/data/demo.bin

.PHONY: kernel initrd-probe linux-demo linux-minimal

# Debian's stock cloud kernel and its own initrd, booted directly as far as this host allows
# (on a host that emulates kernel code: about 45 minutes to "Run /init"; docs/linux.md).
LINUX_DEMO_TIMEOUT ?= 5400
linux-demo: $(STAMP)
	$(VENV)/bin/leanvm run -m 1G -kernel "$$(ls /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -1)" \
	  -initrd "$$(ls /boot/initrd.img-*-cloud-amd64 | sort -V | tail -1)" \
	  -append "console=ttyS0 earlyprintk=serial" --timeout $(LINUX_DEMO_TIMEOUT) --timeline \
	  --sample-rip 10 --trace build/linux-demo-trace.json

# The minimal kernel with the default busybox initramfs, to "Run /init" (about half a minute
# here) and, on hosts whose guest user mode can make system calls, to the init's power-off.
linux-minimal: $(STAMP)
	$(VENV)/bin/leanvm initrd build build/initramfs.cpio
	$(VENV)/bin/leanvm run -m 256M -kernel "$$($(PYTHON) scripts/build-kernel)" \
	  -initrd build/initramfs.cpio -append "console=ttyS0 rodata=off" --timeline --sample-rip 20

# The minimal guest kernel (kernels/minimal.config over tinyconfig): built once, cached in
# build/kernel by its inputs; prints the bzImage's path (docs/kernel.md).
kernel: $(STAMP)
	$(PYTHON) scripts/build-kernel

# Rebuild the probe helper the default initramfs carries, from tests/guests/init/probe.c.
initrd-probe: $(STAMP)
	$(PY) tests/guests/init/build.py probe --out src/leanvm/data/leanvm-probe.bin

clean:
	rm -rf $(VENV) build .pytest_cache .hypothesis

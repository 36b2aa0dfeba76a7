"""Thin wrappers over /dev/kvm: Kvm -> Vm -> Vcpu, mirroring the fd hierarchy. No policy."""

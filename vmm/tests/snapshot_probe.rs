//! Snapshot feasibility probe (input for memory snapshots, not the product): a tiny guest
//! counts in memory and reports each count on an I/O port; after some counts its whole
//! state is saved with the KVM ioctls a snapshot needs (vCPU registers, special registers,
//! FPU, XSAVE and XCRs where the host has them, MSRs, LAPIC, vCPU events, MP state; the
//! in-kernel PIC and IOAPIC, the PIT and the clock; guest memory), restored into a fresh
//! VM, and the guest must go on counting where it stopped. Each ioctl's result is printed
//! with the host kind, so the report says which work on this host.

use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use msb_vmm::host::HostKind;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

const MEM: usize = 1 << 20;
const CODE: u64 = 0x1000;
const COUNTER: u64 = 0x500;
const PORT: u16 = 0x10;

/// Real-mode code: `xor ax,ax; mov ds,ax; l: inc word [0x500]; mov ax,[0x500];
/// out 0x10,ax; jmp l`.
const COUNTING: [u8; 15] = [
    0x31, 0xc0, 0x8e, 0xd8, 0xff, 0x06, 0x00, 0x05, 0xa1, 0x00, 0x05, 0xe7, 0x10, 0xeb, 0xf5,
];

struct Machine {
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
}

fn machine(kvm: Kvm) -> Machine {
    let vm = kvm.create_vm().expect("create VM");
    vm.set_tss_address(0xfffb_d000).expect("TSS address");
    vm.create_irq_chip().expect("in-kernel irqchip");
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .expect("PIT");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let host = mem
        .iter()
        .next()
        .and_then(|r| r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok())
        .expect("host address");
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the region is `mem`'s own mapping; both live in the returned `Machine`, whose
    // VM and vCPU descriptors are dropped before `mem` (field order), after which KVM no
    // longer touches the memory.
    unsafe { vm.set_user_memory_region(region) }.expect("memory slot");
    let vcpu = vm.create_vcpu(0).expect("vCPU");
    Machine {
        _kvm: kvm,
        vm,
        vcpu,
        mem,
    }
}

/// Runs until `n` counts arrived (or a minute passed); returns the last count.
fn count(m: &mut Machine, n: usize) -> Option<u16> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    let mut seen = 0;
    while seen < n && Instant::now() < deadline {
        match m.vcpu.run() {
            Ok(VcpuExit::IoOut(PORT, data)) if data.len() == 2 => {
                last = Some(u16::from_le_bytes([data[0], data[1]]));
                seen += 1;
            }
            Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::IoIn(..)) => {}
            Ok(other) => panic!("unexpected exit {other:?}"),
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    }
    last
}

/// Prints one ioctl's outcome and hands back its value.
fn probe<T, E: std::fmt::Display>(name: &str, r: Result<T, E>) -> Option<T> {
    match r {
        Ok(v) => {
            eprintln!("  {name:<26} ok");
            Some(v)
        }
        Err(e) => {
            eprintln!("  {name:<26} FAILED: {e}");
            None
        }
    }
}

fn irqchip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

#[test]
fn a_saved_guest_goes_on_in_a_new_vm() {
    let Ok(kvm) = Kvm::new() else {
        eprintln!("/dev/kvm not usable here; skipping");
        return;
    };
    eprintln!(
        "snapshot probe: host kind {}",
        HostKind::detect().describe()
    );
    let has_xsave = kvm.check_extension(Cap::Xsave);
    let has_xcrs = kvm.check_extension(Cap::Xcrs);
    let msr_list = kvm.get_msr_index_list().expect("MSR index list");
    let mut a = machine(kvm);
    a.mem
        .write_slice(&COUNTING, GuestAddress(CODE))
        .expect("code");
    let mut sregs = a.vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    a.vcpu.set_sregs(&sregs).expect("set sregs");
    let mut regs = a.vcpu.get_regs().expect("regs");
    regs.rip = CODE;
    regs.rflags = 2;
    a.vcpu.set_regs(&regs).expect("set regs");
    let before = count(&mut a, 100).expect("the guest counts");
    assert_eq!(before, 100);

    eprintln!("save:");
    let regs = probe("KVM_GET_REGS", a.vcpu.get_regs()).expect("regs are the minimum");
    let sregs = probe("KVM_GET_SREGS", a.vcpu.get_sregs()).expect("sregs are the minimum");
    let fpu = probe("KVM_GET_FPU", a.vcpu.get_fpu());
    let xsave = if has_xsave {
        probe("KVM_GET_XSAVE", a.vcpu.get_xsave())
    } else {
        eprintln!("  KVM_GET_XSAVE              not offered (no KVM_CAP_XSAVE)");
        None
    };
    let xcrs = if has_xcrs {
        probe("KVM_GET_XCRS", a.vcpu.get_xcrs())
    } else {
        eprintln!("  KVM_GET_XCRS               not offered (no KVM_CAP_XCRS)");
        None
    };
    let mut msrs = Msrs::from_entries(
        &msr_list
            .as_slice()
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .expect("MSR list fits");
    let got = probe("KVM_GET_MSRS", a.vcpu.get_msrs(&mut msrs));
    if let Some(n) = got {
        eprintln!(
            "  ({n} of {} MSRs the host lists were read)",
            msr_list.as_slice().len()
        );
    }
    let lapic = probe("KVM_GET_LAPIC", a.vcpu.get_lapic());
    let events = probe("KVM_GET_VCPU_EVENTS", a.vcpu.get_vcpu_events());
    let mp = probe("KVM_GET_MP_STATE", a.vcpu.get_mp_state());
    let mut chips = Vec::new();
    for (name, id) in [
        ("KVM_GET_IRQCHIP (PIC 0)", KVM_IRQCHIP_PIC_MASTER),
        ("KVM_GET_IRQCHIP (PIC 1)", KVM_IRQCHIP_PIC_SLAVE),
        ("KVM_GET_IRQCHIP (IOAPIC)", KVM_IRQCHIP_IOAPIC),
    ] {
        let mut c = irqchip(id);
        if probe(name, a.vm.get_irqchip(&mut c)).is_some() {
            chips.push((name, c));
        }
    }
    let pit = probe("KVM_GET_PIT2", a.vm.get_pit2());
    let clock = probe("KVM_GET_CLOCK", a.vm.get_clock());
    let mut memory = vec![0u8; MEM];
    a.mem
        .read_slice(&mut memory, GuestAddress(0))
        .expect("guest memory");
    drop(a);

    eprintln!("restore into a new VM:");
    let mut b = machine(Kvm::new().expect("KVM"));
    b.mem
        .write_slice(&memory, GuestAddress(0))
        .expect("guest memory");
    probe("KVM_SET_SREGS", b.vcpu.set_sregs(&sregs)).expect("sregs restore");
    probe("KVM_SET_REGS", b.vcpu.set_regs(&regs)).expect("regs restore");
    if let Some(f) = &fpu {
        probe("KVM_SET_FPU", b.vcpu.set_fpu(f));
    }
    if let Some(x) = &xsave {
        // SAFETY: `x` came from KVM_GET_XSAVE on a vCPU of the same host, so its size is
        // the legacy 4 KiB area this ioctl expects.
        probe("KVM_SET_XSAVE", unsafe { b.vcpu.set_xsave(x) });
    }
    if let Some(x) = &xcrs {
        probe("KVM_SET_XCRS", b.vcpu.set_xcrs(x));
    }
    if let Some(read) = got {
        if let Some(set) = probe("KVM_SET_MSRS", b.vcpu.set_msrs(&msrs)) {
            eprintln!("  ({set} of the {read} MSRs read were set)");
        }
    }
    if let Some(l) = &lapic {
        probe("KVM_SET_LAPIC", b.vcpu.set_lapic(l));
    }
    if let Some(e) = &events {
        probe("KVM_SET_VCPU_EVENTS", b.vcpu.set_vcpu_events(e));
    }
    if let Some(m) = mp {
        probe("KVM_SET_MP_STATE", b.vcpu.set_mp_state(m));
    }
    for (name, c) in &chips {
        probe(&name.replace("GET", "SET"), b.vm.set_irqchip(c));
    }
    if let Some(p) = &pit {
        probe("KVM_SET_PIT2", b.vm.set_pit2(p));
    }
    if let Some(c) = &clock {
        let mut c = *c;
        // Only the clock value travels; flags describe the source VM's clock.
        c.flags = 0;
        probe("KVM_SET_CLOCK", b.vm.set_clock(&c));
    }
    let after = count(&mut b, 1).expect("the restored guest runs");
    eprintln!("the guest counted to {before} before the save and went on at {after}");
    assert_eq!(
        after,
        before + 1,
        "the restored guest continues where it stopped"
    );
    let in_memory: u16 = b.mem.read_obj(GuestAddress(COUNTER)).expect("counter");
    assert_eq!(in_memory, after, "the restored memory holds the count");
}

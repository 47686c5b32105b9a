//! The hardware-KVM kernel flavour (`microvm`, what users on real KVM boot) cannot boot on
//! this repository's PVM hosts, so QEMU's TCG accelerator (software emulation, no KVM)
//! boots it here with the default initramfs up to the agent's start line on the console.
//! A kernel config or agent change that breaks the hardware-KVM path fails here.

use std::path::Path;
use std::time::Duration;

use msb_e2e::{host_kind, qemu_to_agent_start, QEMU};
use msb_guest_kernel::{ensure_initramfs, ensure_kernel, Flavour, Progress};
use msb_vmm::arch::x86_64::cpuid::CpuProfile;
use msb_vmm::launch::{kernel_cmdline, Launch};

#[test]
fn the_microvm_kernel_boots_to_the_agent_under_tcg() {
    assert!(
        Path::new(QEMU).exists(),
        "{QEMU} is missing: scripts/setup installs qemu-system-x86"
    );
    let kernel =
        ensure_kernel(Flavour::Microvm, &mut Progress::new("guest-kernel")).expect("kernel");
    let initrd = ensure_initramfs(&mut Progress::new("initramfs")).expect("initramfs");
    // The command line msb-vmm gives a hardware-KVM guest booting this initramfs.
    let launch = Launch {
        initrd: Some(initrd.clone()),
        command: vec!["true".into()],
        ..Launch::default()
    };
    let cmdline = kernel_cmdline(&launch, CpuProfile::Host).expect("command line");
    let boot = qemu_to_agent_start(
        &kernel,
        &initrd,
        &cmdline,
        "tcg",
        256,
        Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("the microvm kernel under TCG: {e}"));
    eprintln!(
        "microvm flavour under QEMU TCG (host kind {}): agent started {:.2} s after QEMU's start",
        host_kind(),
        boot.to_agent.as_secs_f64()
    );
}

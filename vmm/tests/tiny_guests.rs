//! The VMM with tiny hand-assembled guests (no Linux): port I/O and MMIO dispatch, the
//! boot timer, the exit device, a reset, and the bzImage boot path.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use msb_protocol::sysdev::ExitStatus;
use msb_vmm::arch::x86_64::cpuid::CpuProfile;
use msb_vmm::host::HostKind;
use msb_vmm::vm::{BootSource, CodeMode, Vm, VmConfig, VmEnd, VmOutcome};

const TIMEOUT: Duration = Duration::from_secs(60);

fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("/dev/kvm not usable here; skipping");
    } else {
        eprintln!("host kind: {}", HostKind::detect().describe());
    }
    ok
}

fn config(boot: BootSource) -> VmConfig {
    VmConfig {
        memory_mib: 16,
        vcpus: 1,
        kvm_path: PathBuf::from("/dev/kvm"),
        boot,
        cpu_profile: CpuProfile::for_host(HostKind::detect()),
        serial_log: None,
        console_echo: false,
        vsock: None,
        fs: Vec::new(),
        net: None,
        net_tls: None,
        net_events: None,
        ready_gate: None,
        fs_limits: Default::default(),
        disks: Vec::new(),
        boot_ram_limit: None,
    }
}

fn run(boot: BootSource) -> VmOutcome {
    let vm = Vm::build(&config(boot), Instant::now()).expect("VM builds");
    vm.run(Some(TIMEOUT)).expect("VM runs")
}

fn code(addr: u64, code: Vec<u8>, mode: CodeMode) -> BootSource {
    BootSource::Code { addr, code, mode }
}

/// `out dx, al` for each byte of `text` (dx already holds the port).
fn out_bytes(text: &[u8]) -> Vec<u8> {
    text.iter().flat_map(|b| [0xb0, *b, 0xee]).collect()
}

#[test]
fn real_mode_port_io_reaches_the_console_and_i8042_resets() {
    if !kvm_available() {
        return;
    }
    let mut c = vec![0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    c.extend(out_bytes(b"pio ok\n"));
    c.extend([0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    c.extend([0xeb, 0xfe]); // jmp $
    let o = run(code(0x1000, c, CodeMode::Real));
    assert_eq!(o.end, VmEnd::Reset("i8042 reset"));
    assert_eq!(o.console_tail, vec!["pio ok".to_string()]);
}

#[test]
fn protected_mode_mmio_reads_magic_marks_boot_and_exits_with_code() {
    if !kvm_available() {
        return;
    }
    let mut c = vec![0xa1, 0x0c, 0x00, 0x00, 0xd0]; // mov eax, [0xd000000c] (MMIO read)
    c.extend([0xba, 0xf8, 0x03, 0x00, 0x00]); // mov edx, 0x3f8
    for _ in 0..3 {
        c.extend([0xee, 0xc1, 0xe8, 0x08]); // out dx, al; shr eax, 8
    }
    c.push(0xee); // out dx, al
    c.extend([0xb0, b'\n', 0xee]);
    c.extend([0xc6, 0x05, 0x00, 0x00, 0x00, 0xd0, 0x7b]); // mov byte [0xd0000000], 123
    c.extend([0xc7, 0x05, 0x04, 0x00, 0x00, 0xd0, 0x03, 0x00, 0x00, 0x00]); // exit 3
    c.extend([0xeb, 0xfe]);
    let o = run(code(0x10_0000, c, CodeMode::Protected32));
    assert_eq!(o.end, VmEnd::Exited(ExitStatus::Code(3)));
    assert_eq!(o.console_tail, vec!["MSB1".to_string()]);
    let ready = o.times.boot_ready.expect("boot timer written");
    let exit = o.times.exit.expect("exit time recorded");
    assert!(o.vcpu_start <= ready && ready <= exit);
    assert_eq!(o.times.first_instruction, None, "no boot stub for raw code");
}

#[test]
fn an_invalid_exit_value_is_reported_not_trusted() {
    if !kvm_available() {
        return;
    }
    // mov dword [0xd0000004], 0xdeadbeef
    let c = vec![
        0xc7, 0x05, 0x04, 0x00, 0x00, 0xd0, 0xef, 0xbe, 0xad, 0xde, 0xeb, 0xfe,
    ];
    let o = run(code(0x10_0000, c, CodeMode::Protected32));
    assert_eq!(o.end, VmEnd::BadExitValue(0xdead_beef));
}

#[test]
fn unclaimed_io_is_counted_and_the_guest_keeps_running() {
    if !kvm_available() {
        return;
    }
    let mut c = vec![0xe6, 0x80]; // out 0x80, al (nobody there)
    c.extend([0xa1, 0x00, 0x00, 0x00, 0xe0]); // mov eax, [0xe0000000] (nobody there)
    c.extend([0xc7, 0x05, 0x04, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00]); // exit 0
    c.extend([0xeb, 0xfe]);
    let o = run(code(0x10_0000, c, CodeMode::Protected32));
    assert_eq!(o.end, VmEnd::Exited(ExitStatus::Code(0)));
    assert_eq!(o.unhandled_io, (1, 1));
}

#[test]
fn a_spinning_guest_is_stopped_at_the_timeout() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::build(
        &config(code(0x1000, vec![0xeb, 0xfe], CodeMode::Real)),
        Instant::now(),
    )
    .expect("VM builds");
    let o = vm.run(Some(Duration::from_millis(300))).expect("VM runs");
    assert_eq!(o.end, VmEnd::TimedOut(Duration::from_millis(300)));
}

#[test]
fn a_paused_guest_runs_no_instruction_until_resumed() {
    use vm_memory::{Bytes, GuestAddress};
    if !kvm_available() {
        return;
    }
    // `inc dword [0x2000]; jmp back`: a counter in guest memory that moves only while the
    // vCPU runs.
    let counter = GuestAddress(0x2000);
    let vm = Vm::build(
        &config(code(
            0x1000,
            vec![0x66, 0xff, 0x06, 0x00, 0x20, 0xeb, 0xf9],
            CodeMode::Real,
        )),
        Instant::now(),
    )
    .expect("VM builds");
    let (mem, control) = (vm.guest_memory(), vm.stopper());
    let read = || mem.read_obj::<u32>(counter).expect("read the counter");
    let runner = std::thread::spawn(move || vm.run(Some(TIMEOUT)).expect("VM runs"));
    let wait_for_more = |than: u32| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while read() <= than {
            assert!(Instant::now() < deadline, "the counter stays at {than}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for_more(0);
    for round in 0..3 {
        control.pause().expect("pause");
        let parked = read();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(read(), parked, "round {round}: the guest ran while paused");
        control.pause().expect("a second pause finds it parked");
        control.resume().expect("resume");
        wait_for_more(parked);
    }
    control.stop("test over");
    let o = runner.join().expect("the VM thread");
    assert_eq!(o.end, VmEnd::StoppedByHost("test over".into()));
    // Once the VM has ended there is nothing to pause.
    assert!(control.pause().is_err());
}

/// A minimal bzImage whose "kernel" checks the zero page the VMM passed in `esi` (the
/// `HdrS` magic of the setup header) and exits 42 if it is right.
fn tiny_bzimage() -> Vec<u8> {
    let setup_sects = 1u8;
    let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    img[0x1f1] = setup_sects;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    img[0x211] = 0x01; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x0010_0000u32.to_le_bytes()); // code32_start
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    let mut k = vec![0x8b, 0x86, 0x02, 0x02, 0x00, 0x00]; // mov eax, [esi+0x202]
    k.extend([0x3d, b'H', b'd', b'r', b'S']); // cmp eax, "HdrS"
    k.extend([0x75, 0x0c]); // jne bad
    k.extend([0xc7, 0x05, 0x04, 0x00, 0x00, 0xd0, 42, 0, 0, 0, 0xeb, 0xfe]); // exit 42
    k.extend([0xc7, 0x05, 0x04, 0x00, 0x00, 0xd0, 1, 0, 0, 0, 0xeb, 0xfe]); // bad: exit 1
    img.extend(k);
    img
}

#[test]
fn a_bzimage_boots_through_the_stub_with_the_zero_page() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("bzImage");
    std::fs::write(&kernel, tiny_bzimage()).expect("write");
    let o = run(BootSource::Kernel {
        kernel,
        initrd: None,
        cmdline: "console=ttyS0".into(),
    });
    assert_eq!(o.end, VmEnd::Exited(ExitStatus::Code(42)));
    assert!(
        o.times.first_instruction.is_some(),
        "the boot stub marked the first instruction"
    );
}

#[test]
fn a_triple_fault_ends_the_vm_as_a_reset() {
    if !kvm_available() {
        return;
    }
    // The IDT limit is 0, so the #UD from ud2 escalates to a triple fault.
    let o = run(code(0x10_0000, vec![0x0f, 0x0b], CodeMode::Protected32));
    eprintln!("triple fault ended as {:?}", o.end);
    assert_eq!(o.end, VmEnd::Reset("triple fault"));
}

mod state_machine {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use msb_vmm::arch::x86_64::cpuid;
    use msb_vmm::arch::{CpuStart, VcpuSetup};
    use msb_vmm::hypervisor::kvm::KvmHypervisor;
    use msb_vmm::hypervisor::{ExitHandler, Hypervisor};
    use msb_vmm::vcpu::{self, VcpuCommand, VcpuState};

    /// Counts the guest's port writes.
    #[derive(Default)]
    struct Counter(AtomicU64);
    impl ExitHandler for Counter {
        fn pio_read(&self, _: u16, _: &mut [u8]) {}
        fn pio_write(&self, _: u16, _: &[u8]) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn mmio_read(&self, _: u64, _: &mut [u8]) {}
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }

    #[test]
    fn pause_stops_the_guest_resume_continues_exit_joins() {
        if !super::kvm_available() {
            return;
        }
        let hv = KvmHypervisor::open(std::path::Path::new("/dev/kvm")).expect("kvm");
        let vm = hv.create_vm().expect("vm");
        let mem = msb_vmm::memory::create(1 << 20).expect("memory");
        msb_vmm::memory::register(&*vm, &mem).expect("register");
        // loop: out 0x80, al; jmp loop
        vm_memory::Bytes::write_slice(
            &mem,
            &[0xe6, 0x80, 0xeb, 0xfc],
            vm_memory::GuestAddress(0x1000),
        )
        .expect("code");
        let vcpu = vm.create_vcpu(0).expect("vcpu");
        let supported = hv.supported_cpuid().expect("cpuid");
        vcpu.configure(&VcpuSetup {
            id: 0,
            cpuid: cpuid::filter(&supported, cpuid::CpuProfile::Host, 0, 1),
            start: CpuStart::RealMode { ip: 0x1000 },
        })
        .expect("configure");
        let counter = Arc::new(Counter::default());
        let handle = vcpu::spawn(
            0,
            vcpu,
            counter.clone(),
            Box::new(|_, end| panic!("vCPU ended: {end:?}")),
        )
        .expect("spawn");
        let count = || counter.0.load(Ordering::SeqCst);

        let wait_for_progress = |from: u64| {
            for _ in 0..500 {
                if count() > from + 10 {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            false
        };
        assert!(wait_for_progress(0), "the guest runs");

        handle.send(VcpuCommand::Pause);
        assert_eq!(
            handle.wait_for(VcpuState::Paused, Duration::from_secs(5)),
            VcpuState::Paused
        );
        let paused_at = count();
        std::thread::sleep(Duration::from_millis(200));
        // At most the exit in flight when the pause landed.
        assert!(count() <= paused_at + 1, "a paused vCPU runs no guest code");

        handle.send(VcpuCommand::Resume);
        assert_eq!(
            handle.wait_for(VcpuState::Running, Duration::from_secs(5)),
            VcpuState::Running
        );
        assert!(wait_for_progress(count()), "the guest runs again");

        handle.send(VcpuCommand::Exit);
        assert_eq!(
            handle.wait_for(VcpuState::Exited, Duration::from_secs(5)),
            VcpuState::Exited
        );
        drop(handle); // joins
    }
}

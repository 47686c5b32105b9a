//! What the basic operations of a process cost inside the guest (a syscall, a thread, a
//! spawn, a page fault, a pipe copy), so the time of a boot or an exec can be accounted
//! for: `benches/guest/costs.c` and `tiny.c` are built static with the host's gcc and run
//! in a VM from a read-only volume. Prints the host kind and the guest's figures.
//!
//! `cargo run --release -p msb-benches --bin guest_costs -- [--memory MiB]`

use std::process::Command;

use msb_benches::{arg, build_guest_program};
use msb_e2e::{artifacts, host_kind};

fn main() {
    let memory = arg("--memory", 512).max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    build_guest_program(dir.path(), "tiny", &["-nostdlib"]);
    build_guest_program(dir.path(), "costs", &["-pthread"]);
    let a = artifacts();
    let out = Command::new(&a.msb_vmm)
        .arg("--kernel")
        .arg(&a.kernel)
        .args(["--memory", &memory.to_string(), "--timeout", "900"])
        .arg("--ro-volume")
        .arg("/costs")
        .arg(dir.path())
        .args(["--", "/costs/costs", "/costs/tiny"])
        .output()
        .expect("msb-vmm runs");
    println!(
        "guest costs: host kind {}; {memory} MiB; 1 vCPU",
        host_kind()
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        std::process::exit(1);
    }
}

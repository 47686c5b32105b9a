//! `msb-guest`: builds the guest kernel, the initramfs and the default root filesystem ahead of time and prints
//! their paths (scripts and CI use it; `msb-vmm` does the same on demand).
//!
//! ```text
//! msb-guest kernel [microvm|pvm-compat]
//! msb-guest initramfs
//! msb-guest rootfs
//! ```

use msb_guest_kernel::{
    ensure_agent_dir, ensure_initramfs, ensure_kernel, ensure_rootfs, Flavour, Progress,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("kernel") => {
            let name = args.get(1).map(String::as_str).unwrap_or("pvm-compat");
            match Flavour::from_name(name) {
                Some(f) => ensure_kernel(f, &mut Progress::new("guest-kernel")),
                None => {
                    eprintln!("msb-guest: unknown flavour {name:?} (microvm or pvm-compat)");
                    std::process::exit(2);
                }
            }
        }
        Some("initramfs") => ensure_initramfs(&mut Progress::new("initramfs")),
        Some("agent") => ensure_agent_dir(&mut Progress::new("agent")),
        Some("rootfs") => ensure_rootfs(&mut Progress::new("rootfs")),
        _ => {
            eprintln!(
                "usage: msb-guest kernel [microvm|pvm-compat] | msb-guest initramfs | msb-guest agent | msb-guest rootfs"
            );
            std::process::exit(2);
        }
    };
    match result {
        Ok(path) => println!("{}", path.display()),
        Err(e) => {
            eprintln!("msb-guest: error: {e}");
            std::process::exit(1);
        }
    }
}

//! Guest memory: anonymous `MAP_NORESERVE` mappings (vm-memory's default for anonymous
//! regions), so the configured size is a limit, not a reservation.

use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::ram_regions;
use crate::hypervisor::{HypervisorError, HypervisorVm};

/// Failures creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("cannot map {size} bytes of guest memory")]
    Map {
        /// Requested size.
        size: u64,
        /// The underlying error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The hypervisor refused the memory slot.
    #[error(transparent)]
    Register(#[from] HypervisorError),
}

/// Maps `size` bytes of guest RAM, split around the MMIO gap.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { size, source })
}

/// Gives every region of `mem` to the VM, one slot each.
pub fn register(vm: &dyn HypervisorVm, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| {
                HypervisorError::call(
                    "find host address of guest memory",
                    std::io::Error::other("region has no host mapping"),
                )
            })?;
        // SAFETY: the region is an mmap owned by `mem`, which the VM keeps alive for its
        // whole life (the `Vm` holds it and drops the vCPUs before it).
        unsafe {
            vm.map_memory(
                slot as u32,
                region.start_addr().raw_value(),
                region.len(),
                host as u64,
            )?;
        }
    }
    Ok(())
}

/// Host address ranges backing guest memory (for accounting RSS).
pub fn host_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter()
        .filter_map(|r| {
            let start = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()? as u64;
            Some((start, start + r.len()))
        })
        .collect()
}

/// Resident memory in `smaps` (the text of a `/proc/<pid>/smaps`), split into (mappings
/// `is_guest(start, end)` accepts, everything else), in KiB.
pub fn rss_split_kib(smaps: &str, is_guest: impl Fn(u64, u64) -> bool) -> (u64, u64) {
    let (mut in_guest, mut other) = (0u64, 0u64);
    let mut current_is_guest = false;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            let kib: u64 = rss
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            if current_is_guest {
                in_guest += kib;
            } else {
                other += kib;
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    current_is_guest = is_guest(a, b);
                }
            }
        }
    }
    (in_guest, other)
}

/// Resident KiB of the host range `start..start + len` (page aligned, mapped).
fn resident_kib(start: u64, len: u64) -> std::io::Result<u64> {
    const PAGE: u64 = 4096;
    let mut vec = vec![0u8; len.div_ceil(PAGE) as usize];
    // SAFETY: the range is a live page-aligned mapping owned by the caller's guest memory,
    // and `vec` has one byte per page of it, as mincore(2) writes.
    let r = unsafe { libc::mincore(start as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(vec.iter().filter(|b| **b & 1 == 1).count() as u64 * (PAGE / 1024))
}

/// This process's resident memory split into (guest memory, the VMM's own), in KiB.
/// Guest pages are counted with mincore(2): the kernel may merge the guest mapping with a
/// neighbouring one, so `/proc/self/smaps` cannot always tell them apart.
pub fn own_rss_split_kib(mem: &GuestMemoryMmap) -> std::io::Result<(u64, u64)> {
    let mut guest = 0;
    for (start, end) in host_ranges(mem) {
        guest += resident_kib(start, end - start)?;
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    let total: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("VmRSS missing from /proc/self/status"))?;
    Ok((guest, total.saturating_sub(guest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_lazily_backed() {
        let mem = create(512 << 20).expect("map");
        let (guest, _) = own_rss_split_kib(&mem).expect("smaps");
        // Nothing touched yet: a NORESERVE anonymous map costs (almost) nothing.
        assert!(
            guest < 1024,
            "untouched guest memory is resident: {guest} KiB"
        );
        vm_memory::Bytes::write_slice(&mem, &[1u8; 1 << 20], GuestAddress(0x100000))
            .expect("write");
        let (guest, _) = own_rss_split_kib(&mem).expect("smaps");
        assert!(guest >= 1024, "written pages are resident: {guest} KiB");
    }
}

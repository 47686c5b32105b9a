//! The virtio-blk device against mock guest memory and a mock virtqueue (no VM): every
//! request type on a raw image in a temporary file, sectors at and past the end, read-only
//! disks, failing host I/O, the worker thread and its interrupts, and a hostile guest:
//! chains without a usable status byte are dropped and counted, every other malformed
//! request is an error status, nothing panics, and the device keeps serving.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use msb_devices::testing::CountingInterrupt;
use msb_devices::virtio::block::event_handler::{Negotiated, BOUNCE_SIZE};
use msb_devices::virtio::block::testing::{
    header, segment, BlockDriver, FailingDisk, GuestQueue, Reply, DATA_IN, DATA_OUT, DESC,
    F_INDIRECT, F_NEXT, F_WRITE, HDR_ADDR, MEM_LEN, QSIZE, STATUS_ADDR, STATUS_UNSET, TABLES,
};
use msb_devices::virtio::block::{
    mmio_transport, BlockError, BlockMetrics, DiskBackend, RawFile, VirtioBlock, BLOCK_DEVICE_ID,
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SEG, SEG_MAX, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use msb_devices::virtio::{
    ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use vm_memory::{Bytes, GuestAddress};

/// Sectors of the test disks (1 MiB).
const SECTORS: u64 = 2048;
const ALL: Negotiated = Negotiated {
    event_idx: false,
    discard: true,
    write_zeroes: true,
};
const WAIT: Duration = Duration::from_secs(5);

/// The byte at `offset` of a fresh test disk: never zero, different in every sector.
fn pattern(offset: u64) -> u8 {
    ((offset / 512) as u8 ^ offset as u8) | 1
}

/// A temporary image of `len` bytes filled with [`pattern`].
fn image(len: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    let bytes: Vec<u8> = (0..len).map(pattern).collect();
    std::fs::write(f.path(), bytes).expect("image");
    f
}

/// A writable test disk and a driver for it, with every feature negotiated.
fn driver() -> (tempfile::NamedTempFile, BlockDriver<RawFile>) {
    let f = image(SECTORS * 512);
    let raw = RawFile::open(f.path(), false).expect("open");
    (f, BlockDriver::new(raw, "msb-test-disk", ALL))
}

fn get(c: &AtomicU64) -> u64 {
    BlockMetrics::get(c)
}

fn host(f: &tempfile::NamedTempFile) -> Vec<u8> {
    std::fs::read(f.path()).expect("read image")
}

/// Bytes that differ from the pattern and from zero.
fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 0x80)
        .collect()
}

fn ioerr(r: &Reply) {
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR, "{r:?}");
    assert_eq!(r.used_len, 1, "only the status byte is written");
}

/// A good read of sector 1 still works.
fn still_serves(d: &mut BlockDriver<impl DiskBackend>) {
    let r = d.read(1, 1);
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    assert_eq!(r.used_len, 513);
}

fn waited(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A malformed request: what is wrong, its header, its descriptors.
type Case = (&'static str, [u8; 16], Vec<(u64, u32, u16)>);

mod block {
    use super::*;

    #[test]
    fn reads_and_writes_round_trip_through_a_raw_file() {
        let (f, mut d) = driver();
        let r = d.read(3, 2);
        assert_eq!(r.status, VIRTIO_BLK_S_OK);
        assert_eq!(r.used_len, 1024 + 1);
        let want: Vec<u8> = (3 * 512..5 * 512).map(pattern).collect();
        assert_eq!(r.data, want);

        let bytes = data(3 * 512, 1);
        let w = d.write(10, &bytes);
        assert_eq!((w.status, w.used_len), (VIRTIO_BLK_S_OK, 1));
        assert_eq!(&host(&f)[10 * 512..13 * 512], &bytes[..]);
        assert_eq!(d.read(10, 3).data, bytes);
        // The last sector is part of the disk.
        let last = d.write(SECTORS - 1, &data(512, 2));
        assert_eq!(last.status, VIRTIO_BLK_S_OK);
        assert_eq!(d.read(SECTORS - 1, 1).data, data(512, 2));

        let m = &d.metrics;
        assert_eq!(get(&m.read_ops), 3);
        assert_eq!(get(&m.read_bytes), 1024 + 1536 + 512);
        assert_eq!(get(&m.write_ops), 2);
        assert_eq!(get(&m.write_bytes), 1536 + 512);
        assert_eq!(get(&m.errors), 0);
        assert_eq!(get(&m.malformed_chains), 0);
        // Nothing else changed on the host.
        let image = host(&f);
        for (i, b) in image.iter().enumerate() {
            let i = i as u64;
            if !(10 * 512..13 * 512).contains(&i) && i < (SECTORS - 1) * 512 {
                assert_eq!(*b, pattern(i), "byte {i}");
            }
        }
    }

    #[test]
    fn large_requests_cross_the_bounce_buffer_and_any_layout_is_served() {
        let (f, mut d) = driver();
        let len = 2 * BOUNCE_SIZE + 4096;
        let bytes = data(len, 9);
        // The data in three uneven descriptors, the header split in two.
        d.guest.put(HDR_ADDR, &header(VIRTIO_BLK_T_OUT, 100));
        d.guest.put(DATA_OUT, &bytes);
        d.guest.put(STATUS_ADDR, &[STATUS_UNSET]);
        let a = DATA_OUT;
        let len32 = len as u32;
        let w = d.raw(&[
            (HDR_ADDR, 5, 0),
            (HDR_ADDR + 5, 11, 0),
            (a, 1000, 0),
            (a + 1000, 300_000, 0),
            (a + 301_000, len32 - 301_000, 0),
            (STATUS_ADDR, 1, F_WRITE),
        ]);
        assert_eq!(w, 1);
        assert_eq!(d.guest.get(STATUS_ADDR, 1), [VIRTIO_BLK_S_OK]);
        assert_eq!(&host(&f)[100 * 512..100 * 512 + len], &bytes[..]);

        // A read whose buffer and status byte share the last descriptor.
        d.guest.put(HDR_ADDR, &header(VIRTIO_BLK_T_IN, 100));
        d.guest.put(DATA_IN, &vec![0u8; len + 1]);
        let used = d.raw(&[
            (HDR_ADDR, 16, 0),
            (DATA_IN, 7, F_WRITE),
            (DATA_IN + 7, len32 - 7 + 1, F_WRITE),
        ]);
        assert_eq!(used, len32 + 1);
        assert_eq!(d.guest.get(DATA_IN, len), bytes);
        assert_eq!(d.guest.get(DATA_IN + len as u64, 1), [VIRTIO_BLK_S_OK]);

        // The same read through an indirect table.
        d.guest.put(DATA_IN, &vec![0u8; len]);
        d.guest.put(STATUS_ADDR, &[STATUS_UNSET]);
        d.guest.write_chain(
            TABLES,
            &[
                (HDR_ADDR, 16, 0),
                (DATA_IN, len32, F_WRITE),
                (STATUS_ADDR, 1, F_WRITE),
            ],
        );
        d.guest.write_desc(DESC, 0, (TABLES, 48, F_INDIRECT, 0));
        assert_eq!(d.raw_table(0), len32 + 1);
        assert_eq!(d.guest.get(DATA_IN, len), bytes);
        assert_eq!(d.guest.get(STATUS_ADDR, 1), [VIRTIO_BLK_S_OK]);
        assert_eq!(get(&d.metrics.read_bytes), 2 * len as u64);
        assert_eq!(get(&d.metrics.write_bytes), len as u64);
    }

    #[test]
    fn flush_succeeds_and_is_counted() {
        let (_f, mut d) = driver();
        d.write(0, &data(512, 3));
        let r = d.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0);
        assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_OK, 1));
        // A sector or data in a flush do not matter.
        let r = d.request(VIRTIO_BLK_T_FLUSH, 77, &[0u8; 512], 0);
        assert_eq!(r.status, VIRTIO_BLK_S_OK);
        assert_eq!(get(&d.metrics.flushes), 2);
    }

    #[test]
    fn get_id_answers_the_serial() {
        let (_f, mut d) = driver();
        let r = d.get_id();
        assert_eq!(r.status, VIRTIO_BLK_S_OK);
        assert_eq!(r.used_len, 21);
        let mut want = b"msb-test-disk".to_vec();
        want.resize(20, 0);
        assert_eq!(r.data, want);
        // A shorter buffer gets what fits; a larger one the 20 bytes.
        let r = d.request(VIRTIO_BLK_T_GET_ID, 0, &[], 4);
        assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_OK, 5));
        assert_eq!(r.data, b"msb-");
        let r = d.request(VIRTIO_BLK_T_GET_ID, 0, &[], 512);
        assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_OK, 21));
        assert_eq!(&r.data[..20], &want[..]);
        // No buffer at all, or data to write: errors.
        ioerr(&d.request(VIRTIO_BLK_T_GET_ID, 0, &[], 0));
        ioerr(&d.request(VIRTIO_BLK_T_GET_ID, 0, &[1u8; 16], 20));
        // A serial of 20 characters has no NUL.
        let f = image(4096);
        let raw = RawFile::open(f.path(), true).expect("open");
        let mut d = BlockDriver::new(raw, "abcdefghijklmnopqrst", ALL);
        assert_eq!(d.get_id().data, b"abcdefghijklmnopqrst");
    }

    #[test]
    fn bad_serials_are_refused() {
        let f = image(4096);
        let raw = || RawFile::open(f.path(), true).expect("open");
        assert!(matches!(
            VirtioBlock::new(raw(), "this serial is far too long"),
            Err(BlockError::Serial(_))
        ));
        assert!(matches!(
            VirtioBlock::new(raw(), "tab\there"),
            Err(BlockError::Serial(_))
        ));
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zeros() {
        let (f, mut d) = driver();
        let mut segs = segment(8, 16, 0).to_vec();
        segs.extend_from_slice(&segment(100, 1, 0));
        let r = d.request(VIRTIO_BLK_T_DISCARD, 0, &segs, 0);
        assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_OK, 1));
        let r = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &segment(200, 3, 0), 0);
        assert_eq!(r.status, VIRTIO_BLK_S_OK);
        let unmap = segment(300, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let r = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &unmap, 0);
        assert_eq!(r.status, VIRTIO_BLK_S_OK);
        // Up to the last sector, and a segment of no sectors.
        let r = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &segment(SECTORS - 1, 1, 0), 0);
        assert_eq!(r.status, VIRTIO_BLK_S_OK);
        let r = d.request(VIRTIO_BLK_T_DISCARD, 0, &segment(SECTORS, 0, 0), 0);
        assert_eq!(r.status, VIRTIO_BLK_S_OK);

        let zeroed = [
            (8, 24),
            (100, 101),
            (200, 203),
            (300, 308),
            (SECTORS - 1, SECTORS),
        ];
        for &(s, e) in &zeroed {
            let r = d.read(s, (e - s) as u32);
            assert!(r.data.iter().all(|&b| b == 0), "sectors {s}..{e}");
        }
        let image = host(&f);
        assert_eq!(image.len() as u64, SECTORS * 512);
        for (i, b) in image.iter().enumerate() {
            let sector = i as u64 / 512;
            let z = zeroed.iter().any(|&(s, e)| (s..e).contains(&sector));
            assert_eq!(*b, if z { 0 } else { pattern(i as u64) }, "byte {i}");
        }
        assert_eq!(get(&d.metrics.discards), 2);
        assert_eq!(get(&d.metrics.write_zeroes), 3);
        assert_eq!(get(&d.metrics.errors), 0);
    }

    #[test]
    fn discard_and_write_zeroes_limits_and_flags_are_checked() {
        let (f, mut d) = driver();
        let before = host(&f);
        let dz = [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES];
        for t in dz {
            // Not whole segments, or none.
            ioerr(&d.request(t, 0, &segment(0, 1, 0)[..15], 0));
            ioerr(&d.request(t, 0, &[], 0));
            // Past the end, straddling it, overflowing.
            ioerr(&d.request(t, 0, &segment(SECTORS, 1, 0), 0));
            ioerr(&d.request(t, 0, &segment(SECTORS - 1, 2, 0), 0));
            ioerr(&d.request(t, 0, &segment(u64::MAX, 1, 0), 0));
            ioerr(&d.request(t, 0, &segment(u64::MAX / 512 + 1, 0, 0), 0));
            // Over the configuration's limits.
            ioerr(&d.request(t, 0, &segment(0, MAX_DISCARD_SECTORS + 1, 0), 0));
            let many: Vec<u8> = (0..MAX_DISCARD_SEG.max(MAX_WRITE_ZEROES_SEG) + 1)
                .flat_map(|i| segment(u64::from(i), 1, 0))
                .collect();
            ioerr(&d.request(t, 0, &many, 0));
            // A good segment after a bad one: nothing is applied.
            let mut mixed = segment(0, 1, 0).to_vec();
            mixed.extend_from_slice(&segment(SECTORS, 1, 0));
            ioerr(&d.request(t, 0, &mixed, 0));
            // A buffer to fill.
            ioerr(&d.request(t, 0, &segment(0, 1, 0), 512));
            // Unknown flags.
            let r = d.request(t, 0, &segment(0, 1, 4), 0);
            assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_UNSUPP, 1));
        }
        // Unmap is for write-zeroes only.
        let r = d.request(VIRTIO_BLK_T_DISCARD, 0, &segment(0, 1, 1), 0);
        assert_eq!(r.status, VIRTIO_BLK_S_UNSUPP);
        assert_eq!(host(&f), before);
        assert_eq!(get(&d.metrics.discards), 0);
        assert_eq!(get(&d.metrics.write_zeroes), 0);
        assert_eq!(get(&d.metrics.unsupported), 3);
        assert_eq!(get(&d.metrics.errors), 20);
        still_serves(&mut d);
    }

    #[test]
    fn discard_and_write_zeroes_need_their_features() {
        let f = image(SECTORS * 512);
        let before = host(&f);
        let raw = RawFile::open(f.path(), false).expect("open");
        let mut d = BlockDriver::new(raw, "", Negotiated::default());
        for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let r = d.request(t, 0, &segment(0, 8, 0), 0);
            assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_UNSUPP, 1));
        }
        assert_eq!(host(&f), before);
    }

    #[test]
    fn sectors_at_or_past_the_end_are_io_errors() {
        let (f, mut d) = driver();
        let before = host(&f);
        let cases = [
            (SECTORS, 1),
            (SECTORS - 1, 2),
            (SECTORS + 1_000_000, 1),
            (u64::MAX, 1),
            (u64::MAX - 1, 2),
            // sector * 512 overflows u64.
            (u64::MAX / 512 + 1, 1),
            (1 << 55, 8),
        ];
        for (sector, n) in cases {
            ioerr(&d.read(sector, n));
            ioerr(&d.write(sector, &data(n as usize * 512, 4)));
        }
        assert_eq!(host(&f), before);
        assert_eq!(get(&d.metrics.errors), 2 * cases.len() as u64);
        assert_eq!(get(&d.metrics.read_bytes), 0);
        assert_eq!(get(&d.metrics.write_bytes), 0);
        still_serves(&mut d);
    }

    #[test]
    fn a_partial_last_sector_is_not_offered() {
        let f = image(4 * 512 + 300);
        let raw = RawFile::open(f.path(), false).expect("open");
        let dev = VirtioBlock::new(raw, "").expect("device");
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 4);
        drop(dev);
        let raw = RawFile::open(f.path(), false).expect("open");
        let mut d = BlockDriver::new(raw, "", ALL);
        assert_eq!(d.read(3, 1).status, VIRTIO_BLK_S_OK);
        ioerr(&d.read(4, 1));
        ioerr(&d.write(4, &[0u8; 512]));
    }

    #[test]
    fn a_read_only_disk_refuses_every_change() {
        let f = image(SECTORS * 512);
        let before = host(&f);
        let raw = RawFile::open(f.path(), true).expect("open");
        // The driver claims every feature: the device checks anyway.
        let mut d = BlockDriver::new(raw, "ro", ALL);
        ioerr(&d.write(0, &data(512, 5)));
        ioerr(&d.write(SECTORS - 8, &data(4096, 5)));
        ioerr(&d.request(VIRTIO_BLK_T_DISCARD, 0, &segment(0, 8, 0), 0));
        ioerr(&d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &segment(0, 8, 0), 0));
        let unmap = segment(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        ioerr(&d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &unmap, 0));
        // Reads, flushes and the id still work.
        let r = d.read(0, 1);
        assert_eq!(r.status, VIRTIO_BLK_S_OK);
        assert_eq!(r.data, before[..512]);
        assert_eq!(
            d.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0).status,
            VIRTIO_BLK_S_OK
        );
        assert_eq!(d.get_id().status, VIRTIO_BLK_S_OK);
        assert_eq!(host(&f), before);
        assert_eq!(get(&d.metrics.errors), 5);
        assert_eq!(get(&d.metrics.io_failures), 0);
        assert_eq!(get(&d.metrics.write_bytes), 0);

        // Offered features and configuration say so too.
        let raw = RawFile::open(f.path(), true).expect("open");
        let mut dev = VirtioBlock::new(raw, "ro").expect("device");
        let feats = dev.avail_features();
        assert_ne!(feats & VIRTIO_BLK_F_RO, 0);
        assert_eq!(
            feats & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES),
            0
        );
        dev.set_acked_features(u64::MAX);
        assert_eq!(dev.acked_features(), feats);
    }

    #[test]
    fn unsupported_types_get_unsupp() {
        let (f, mut d) = driver();
        let before = host(&f);
        // GET_LIFETIME (10), SECURE_ERASE (14), SCSI commands (2), and nonsense.
        for t in [2, 3, 5, 10, 14, 0x8000_0000, u32::MAX] {
            let r = d.request(t, 0, &[], 512);
            assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_UNSUPP, 1), "type {t}");
            assert!(r.data.iter().all(|&b| b == 0));
        }
        assert_eq!(get(&d.metrics.unsupported), 7);
        assert_eq!(host(&f), before);
        still_serves(&mut d);
    }

    #[test]
    fn failing_host_io_is_an_io_error_and_counted() {
        let f = image(SECTORS * 512);
        let raw = RawFile::open(f.path(), false).expect("open");
        let (disk, failing) = FailingDisk::new(raw);
        let mut d = BlockDriver::new(disk, "", ALL);
        failing.store(true, std::sync::atomic::Ordering::SeqCst);
        ioerr(&d.read(0, 1));
        ioerr(&d.write(0, &data(512, 6)));
        ioerr(&d.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0));
        ioerr(&d.request(VIRTIO_BLK_T_DISCARD, 0, &segment(0, 1, 0), 0));
        assert_eq!(get(&d.metrics.io_failures), 4);
        assert_eq!(get(&d.metrics.errors), 4);
        failing.store(false, std::sync::atomic::Ordering::SeqCst);
        still_serves(&mut d);
        assert_eq!(get(&d.metrics.read_ops), 1);
    }

    #[test]
    fn chains_without_a_usable_status_byte_are_dropped_and_counted() {
        let (f, mut d) = driver();
        let before = host(&f);
        d.guest.put(HDR_ADDR, &header(VIRTIO_BLK_T_OUT, 0));
        d.guest.put(DATA_OUT, &data(512, 7));
        let chains: Vec<Vec<(u64, u32, u16)>> = vec![
            // No status descriptor: the chain ends with the data.
            vec![(HDR_ADDR, 16, 0), (DATA_OUT, 512, 0)],
            // Header alone.
            vec![(HDR_ADDR, 16, 0)],
            // The status descriptor is device-readable.
            vec![(HDR_ADDR, 16, 0), (DATA_OUT, 512, 0), (STATUS_ADDR, 1, 0)],
            // The status descriptor is empty.
            vec![
                (HDR_ADDR, 16, 0),
                (DATA_OUT, 512, 0),
                (STATUS_ADDR, 0, F_WRITE),
            ],
            // The status byte is outside guest memory.
            vec![(HDR_ADDR, 16, 0), (DATA_OUT, 512, 0), (MEM_LEN, 1, F_WRITE)],
            vec![(HDR_ADDR, 16, 0), (u64::MAX, 1, F_WRITE)],
            // A huge status descriptor whose last byte is past guest memory.
            vec![(HDR_ADDR, 16, 0), (STATUS_ADDR, u32::MAX, F_WRITE)],
            // More than 4 GiB in all: virtio-queue stops the chain early.
            vec![
                (HDR_ADDR, 16, 0),
                (DATA_IN, u32::MAX, F_WRITE),
                (STATUS_ADDR, 1, F_WRITE),
            ],
        ];
        for (i, c) in chains.iter().enumerate() {
            d.guest.put(STATUS_ADDR, &[STATUS_UNSET]);
            assert_eq!(d.raw(c), 0, "chain {i} is returned with nothing written");
            assert_eq!(d.guest.get(STATUS_ADDR, 1), [STATUS_UNSET], "chain {i}");
        }
        assert_eq!(get(&d.metrics.malformed_chains), chains.len() as u64);
        assert_eq!(get(&d.metrics.write_ops), 0);
        assert_eq!(host(&f), before);
        still_serves(&mut d);
    }

    #[test]
    fn descriptor_loops_and_broken_links_are_dropped() {
        let (f, mut d) = driver();
        let before = host(&f);
        d.guest.put(HDR_ADDR, &header(VIRTIO_BLK_T_OUT, 0));
        d.guest.put(STATUS_ADDR, &[STATUS_UNSET]);
        // header -> status -> header -> ...
        d.guest.write_desc(DESC, 0, (HDR_ADDR, 16, F_NEXT, 1));
        d.guest
            .write_desc(DESC, 1, (STATUS_ADDR, 1, F_WRITE | F_NEXT, 0));
        assert_eq!(d.raw_table(0), 0);
        // A writable descriptor that points at itself.
        d.guest
            .write_desc(DESC, 5, (DATA_IN, 512, F_WRITE | F_NEXT, 5));
        assert_eq!(d.raw_table(5), 0);
        // A loop inside an indirect table.
        d.guest.write_desc(TABLES, 0, (HDR_ADDR, 16, F_NEXT, 1));
        d.guest.write_desc(TABLES, 1, (DATA_OUT, 512, F_NEXT, 2));
        d.guest
            .write_desc(TABLES, 2, (STATUS_ADDR, 1, F_WRITE | F_NEXT, 1));
        d.guest.write_desc(DESC, 0, (TABLES, 48, F_INDIRECT, 0));
        assert_eq!(d.raw_table(0), 0);
        // `next` past the table.
        d.guest
            .write_desc(DESC, 0, (HDR_ADDR, 16, F_NEXT, QSIZE + 3));
        assert_eq!(d.raw_table(0), 0);
        // An indirect table that is not whole descriptors, or inside another.
        d.guest.write_desc(DESC, 0, (TABLES, 47, F_INDIRECT, 0));
        assert_eq!(d.raw_table(0), 0);
        d.guest
            .write_desc(TABLES, 0, (TABLES + 64, 16, F_INDIRECT, 0));
        d.guest.write_desc(DESC, 0, (TABLES, 16, F_INDIRECT, 0));
        assert_eq!(d.raw_table(0), 0);
        assert_eq!(d.guest.get(STATUS_ADDR, 1), [STATUS_UNSET]);
        assert_eq!(get(&d.metrics.malformed_chains), 6);

        // A head past the table: nothing to serve, and no used entry can name it.
        d.guest.publish(QSIZE + 7);
        assert_eq!(d.run(), 0);
        assert_eq!(get(&d.metrics.malformed_chains), 7);
        assert_eq!(get(&d.metrics.used_ring_errors), 1);

        assert_eq!(host(&f), before);
        still_serves(&mut d);
    }

    #[test]
    fn malformed_requests_with_a_status_byte_get_io_errors() {
        let (f, mut d) = driver();
        let before = host(&f);
        let st = (STATUS_ADDR, 1, F_WRITE);
        let cases: Vec<Case> = vec![
            (
                "header too short",
                header(VIRTIO_BLK_T_IN, 0),
                vec![(HDR_ADDR, 8, 0), (DATA_IN, 512, F_WRITE), st],
            ),
            (
                "no header",
                header(VIRTIO_BLK_T_IN, 0),
                vec![(DATA_IN, 512, F_WRITE), st],
            ),
            (
                "empty header",
                header(VIRTIO_BLK_T_IN, 0),
                vec![(HDR_ADDR, 0, 0), (DATA_IN, 512, F_WRITE), st],
            ),
            (
                "header outside memory",
                header(VIRTIO_BLK_T_IN, 0),
                vec![(MEM_LEN - 8, 16, 0), (DATA_IN, 512, F_WRITE), st],
            ),
            (
                "read with readable data",
                header(VIRTIO_BLK_T_IN, 0),
                vec![(HDR_ADDR, 16, 0), (DATA_OUT, 512, 0), st],
            ),
            (
                "read and write data",
                header(VIRTIO_BLK_T_IN, 0),
                vec![
                    (HDR_ADDR, 16, 0),
                    (DATA_OUT, 512, 0),
                    (DATA_IN, 512, F_WRITE),
                    st,
                ],
            ),
            (
                "write with writable data",
                header(VIRTIO_BLK_T_OUT, 0),
                vec![(HDR_ADDR, 16, 0), (DATA_IN, 512, F_WRITE), st],
            ),
            (
                "write with both",
                header(VIRTIO_BLK_T_OUT, 0),
                vec![
                    (HDR_ADDR, 16, 0),
                    (DATA_OUT, 512, 0),
                    (DATA_IN, 512, F_WRITE),
                    st,
                ],
            ),
            (
                "readable after writable",
                header(VIRTIO_BLK_T_OUT, 0),
                vec![
                    (HDR_ADDR, 16, 0),
                    (DATA_IN, 512, F_WRITE),
                    (DATA_OUT, 512, 0),
                    st,
                ],
            ),
            (
                "read of nothing",
                header(VIRTIO_BLK_T_IN, 0),
                vec![(HDR_ADDR, 16, 0), st],
            ),
            (
                "write of nothing",
                header(VIRTIO_BLK_T_OUT, 0),
                vec![(HDR_ADDR, 16, 0), st],
            ),
            (
                "zero-length read buffer",
                header(VIRTIO_BLK_T_IN, 0),
                vec![(HDR_ADDR, 16, 0), (DATA_IN, 0, F_WRITE), st],
            ),
            (
                "zero-length write data",
                header(VIRTIO_BLK_T_OUT, 0),
                vec![(HDR_ADDR, 16, 0), (DATA_OUT, 0, 0), st],
            ),
            (
                "read of 100 bytes",
                header(VIRTIO_BLK_T_IN, 0),
                vec![(HDR_ADDR, 16, 0), (DATA_IN, 100, F_WRITE), st],
            ),
            (
                "read of 513 bytes",
                header(VIRTIO_BLK_T_IN, 0),
                vec![(HDR_ADDR, 16, 0), (DATA_IN, 513, F_WRITE), st],
            ),
            (
                "write of 511 bytes",
                header(VIRTIO_BLK_T_OUT, 0),
                vec![(HDR_ADDR, 16, 0), (DATA_OUT, 511, 0), st],
            ),
            (
                "write of 513 bytes",
                header(VIRTIO_BLK_T_OUT, 0),
                vec![
                    (HDR_ADDR, 16, 0),
                    (DATA_OUT, 512, 0),
                    (DATA_OUT + 512, 1, 0),
                    st,
                ],
            ),
            (
                "read buffer past guest memory",
                header(VIRTIO_BLK_T_IN, 0),
                vec![(HDR_ADDR, 16, 0), (MEM_LEN - 512, 1024, F_WRITE), st],
            ),
            (
                "huge read buffer",
                header(VIRTIO_BLK_T_IN, 0),
                vec![(HDR_ADDR, 16, 0), (DATA_IN, 0xffff_fe00, F_WRITE), st],
            ),
            (
                "huge write data",
                header(VIRTIO_BLK_T_OUT, 0),
                vec![(HDR_ADDR, 16, 0), (DATA_OUT, 0x8000_0000, 0), st],
            ),
            (
                "write data outside memory",
                header(VIRTIO_BLK_T_OUT, 0),
                vec![(HDR_ADDR, 16, 0), (u64::MAX - 511, 512, 0), st],
            ),
            (
                "read buffer outside memory",
                header(VIRTIO_BLK_T_IN, 0),
                vec![(HDR_ADDR, 16, 0), (MEM_LEN + 4096, 512, F_WRITE), st],
            ),
        ];
        for (what, hdr, chain) in &cases {
            d.guest.put(HDR_ADDR, hdr);
            d.guest.put(STATUS_ADDR, &[STATUS_UNSET]);
            assert_eq!(d.raw(chain), 1, "{what}: only the status byte");
            assert_eq!(d.guest.get(STATUS_ADDR, 1), [VIRTIO_BLK_S_IOERR], "{what}");
            still_serves(&mut d);
        }
        assert_eq!(get(&d.metrics.errors), cases.len() as u64);
        assert_eq!(get(&d.metrics.malformed_chains), 0);
        assert_eq!(get(&d.metrics.io_failures), 0);
        assert_eq!(get(&d.metrics.write_bytes), 0);
        assert_eq!(host(&f), before);
    }

    #[test]
    fn more_segments_than_seg_max_are_refused() {
        let (_f, mut d) = driver();
        d.guest.put(HDR_ADDR, &header(VIRTIO_BLK_T_IN, 0));
        d.guest.put(STATUS_ADDR, &[STATUS_UNSET]);
        let table = |n: u32| -> Vec<(u64, u32, u16)> {
            let mut v = vec![(HDR_ADDR, 16, 0)];
            v.extend((0..n).map(|i| (DATA_IN + 512 * u64::from(i), 512, F_WRITE)));
            v.push((STATUS_ADDR, 1, F_WRITE));
            v
        };
        // seg_max data descriptors (in an indirect table) are fine; one more is not.
        d.guest.write_chain(TABLES, &table(SEG_MAX));
        d.guest
            .write_desc(DESC, 0, (TABLES, 16 * (SEG_MAX + 2), F_INDIRECT, 0));
        assert_eq!(d.raw_table(0), SEG_MAX * 512 + 1);
        assert_eq!(d.guest.get(STATUS_ADDR, 1), [VIRTIO_BLK_S_OK]);
        d.guest.write_chain(TABLES, &table(SEG_MAX + 1));
        d.guest
            .write_desc(DESC, 0, (TABLES, 16 * (SEG_MAX + 3), F_INDIRECT, 0));
        assert_eq!(d.raw_table(0), 1);
        assert_eq!(d.guest.get(STATUS_ADDR, 1), [VIRTIO_BLK_S_IOERR]);
        still_serves(&mut d);
    }

    /// Sends `rounds` chains of random descriptors (fixed seed: the same storm every run)
    /// whose headers, when they are read from where the test put them, ask for sectors past
    /// the end; every chain must be used, and the device must still serve afterwards.
    fn storm(d: &mut BlockDriver<RawFile>, rounds: u32, seed: u64) {
        let mut x = seed;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let addrs = [
            HDR_ADDR,
            STATUS_ADDR,
            DATA_IN,
            DATA_OUT,
            TABLES,
            MEM_LEN - 8,
            u64::MAX - 3,
        ];
        let types = [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            99,
        ];
        for _ in 0..rounds {
            let t = types[(rnd() % types.len() as u64) as usize];
            d.guest
                .put(HDR_ADDR, &header(t, SECTORS + rnd() % 1_000_000));
            let mut segs = Vec::new();
            for _ in 0..4 {
                let s = segment(SECTORS + rnd() % 64, (rnd() % 64) as u32, 0);
                segs.extend_from_slice(&s);
            }
            d.guest.put(DATA_OUT, &segs);
            let n = 1 + (rnd() % 6) as usize;
            for i in 0..n {
                let mut flags = (rnd() % 8) as u16;
                let (addr, len) = if flags & F_INDIRECT != 0 {
                    (TABLES, 16 * (1 + (rnd() % 4) as u32))
                } else {
                    let addr = addrs[(rnd() % addrs.len() as u64) as usize];
                    let len = match rnd() % 5 {
                        0 => 0,
                        1 => 1,
                        2 => 16,
                        3 => 512 * (1 + (rnd() % 4) as u32),
                        _ => rnd() as u32,
                    };
                    (addr, len)
                };
                let next = if rnd() % 4 == 0 {
                    (rnd() % 300) as u16
                } else {
                    i as u16 + 1
                };
                if i + 1 == n {
                    flags &= !F_NEXT;
                }
                d.guest.write_desc(DESC, i as u16, (addr, len, flags, next));
            }
            // And a random indirect table for the chains that point at it.
            for i in 0..4u16 {
                let addr = addrs[(rnd() % addrs.len() as u64) as usize];
                let desc = (
                    addr,
                    (rnd() % 1024) as u32,
                    (rnd() % 4) as u16,
                    (rnd() % 6) as u16,
                );
                d.guest.write_desc(TABLES, i, desc);
            }
            d.raw_table(0);
        }
        still_serves(d);
    }

    #[test]
    fn a_storm_of_random_chains_never_takes_the_device_down() {
        let (_f, mut d) = driver();
        storm(&mut d, 2000, 0x9e37_79b9_7f4a_7c15);
        // A read-only disk through the same storm: nothing on the host changes.
        let f = image(SECTORS * 512);
        let before = host(&f);
        let raw = RawFile::open(f.path(), true).expect("open");
        let mut d = BlockDriver::new(raw, "", ALL);
        storm(&mut d, 1000, 0x2545_f491_4f6c_dd1d);
        assert_eq!(host(&f), before);
        assert_eq!(get(&d.metrics.write_ops), 0);
    }

    #[test]
    fn event_index_suppresses_interrupts() {
        let f = image(SECTORS * 512);
        let raw = RawFile::open(f.path(), false).expect("open");
        let mut d = BlockDriver::new(
            raw,
            "",
            Negotiated {
                event_idx: true,
                ..ALL
            },
        );
        let used_event =
            GuestAddress(msb_devices::virtio::block::testing::AVAIL + 4 + 2 * u64::from(QSIZE));
        // The driver wants an interrupt only once entry 10 is used.
        d.guest
            .mem
            .write_obj(10u16, used_event)
            .expect("used_event");
        d.read(0, 1);
        assert!(!d.notified);
        // Now after the next one.
        d.guest.mem.write_obj(1u16, used_event).expect("used_event");
        d.read(0, 1);
        assert!(d.notified);

        // Without the feature every used chain interrupts.
        let raw = RawFile::open(f.path(), false).expect("open");
        let mut d = BlockDriver::new(raw, "", ALL);
        d.guest
            .mem
            .write_obj(10u16, used_event)
            .expect("used_event");
        d.read(0, 1);
        assert!(d.notified);
    }

    #[test]
    fn the_worker_serves_kicks_and_stops_on_reset() {
        let f = image(SECTORS * 512);
        let raw = RawFile::open(f.path(), false).expect("open");
        let mut dev = VirtioBlock::new(raw, "worker").expect("device");
        let metrics = dev.metrics();
        assert_eq!(dev.device_type(), BLOCK_DEVICE_ID);
        assert_eq!(dev.queue_max_sizes(), &[256]);
        let feats = dev.avail_features();
        for f in [VIRTIO_F_VERSION_1, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD] {
            assert_ne!(feats & f, 0);
        }
        assert_eq!(feats & VIRTIO_BLK_F_RO, 0);
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), SECTORS);
        // One queue, no more, no less.
        let g = GuestQueue::new();
        let irq = || Arc::new(VirtioInterrupt::new(Arc::new(CountingInterrupt::default())));
        for (queues, bad) in [(vec![], 0), (vec![g.queue(), g.queue()], 1)] {
            match dev.activate(g.mem.clone(), irq(), queues) {
                Err(ActivateError::BadQueue(i)) => assert_eq!(i, bad),
                other => panic!("activation with the wrong queues: {other:?}"),
            }
            assert!(!dev.is_active());
        }

        for round in 0..2 {
            let mut g = GuestQueue::new();
            let count = Arc::new(CountingInterrupt::default());
            // Without event indices: an interrupt for every pass that used chains.
            dev.set_acked_features(feats & !VIRTIO_RING_F_EVENT_IDX);
            dev.activate(
                g.mem.clone(),
                Arc::new(VirtioInterrupt::new(count.clone())),
                vec![g.queue()],
            )
            .expect("activate");
            assert!(dev.is_active());
            let bytes = data(4096, round);
            g.request(VIRTIO_BLK_T_OUT, 16, &bytes, 0);
            dev.queue_notify(0);
            waited("the write", || g.used_idx() == 1);
            assert_eq!(g.reply(0).status, VIRTIO_BLK_S_OK);
            g.request(VIRTIO_BLK_T_IN, 16, &[], 4096);
            dev.queue_notify(0);
            waited("the read", || g.used_idx() == 2);
            let r = g.reply(4096);
            assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_OK, 4097));
            assert_eq!(r.data, bytes);
            waited("the interrupts", || count.count() >= 2);
            // A notification for a queue the device does not have is ignored.
            dev.queue_notify(7);
            dev.reset();
            assert!(!dev.is_active());
            assert_eq!(dev.acked_features(), 0);
            // After reset nothing is served.
            g.request(VIRTIO_BLK_T_IN, 0, &[], 512);
            dev.queue_notify(0);
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(g.used_idx(), 2);
            assert!(
                host(&f)[16 * 512..24 * 512] == bytes[..],
                "the write is on the host"
            );
        }
        assert_eq!(get(&metrics.write_ops), 2);
        assert_eq!(get(&metrics.read_ops), 2);
        assert!(get(&metrics.interrupts) >= 4);
    }

    #[test]
    fn the_mmio_transport_shows_a_block_device() {
        let f = image(SECTORS * 512);
        let raw = RawFile::open(f.path(), true).expect("open");
        let g = GuestQueue::new();
        let (bus, _metrics) = mmio_transport(
            raw,
            "mmio",
            g.mem.clone(),
            Arc::new(CountingInterrupt::default()),
        )
        .expect("transport");
        let mut bus = bus.lock().expect("bus");
        let mut word = [0u8; 4];
        bus.read(0x008, &mut word);
        assert_eq!(u32::from_le_bytes(word), BLOCK_DEVICE_ID);
        bus.read(0x100, &mut word);
        assert_eq!(u32::from_le_bytes(word), SECTORS as u32);
        // Feature word 0 carries RO (bit 5).
        bus.read(0x010, &mut word);
        assert_ne!(u32::from_le_bytes(word) & (1 << 5), 0);
    }
}

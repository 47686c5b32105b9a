//! Seeds of the `layer` and `archive` targets: layer tars and image archives from the SDK's
//! fixture, and hand-made tars with what an image may try (paths that climb out, links
//! through symlinks, device nodes, PAX xattrs, long names, sparse and truncated entries).

use std::io::Write;

use microsandbox::image::fixture::{FixtureEntry, ImageFixture};

/// A raw tar entry: name, type flag, mode, size (as written), link name, data, and the
/// device numbers.
#[derive(Debug, Clone, Default)]
pub struct RawEntry {
    /// Path as written in the header.
    pub name: Vec<u8>,
    /// Type flag (`b'0'` file, `b'5'` directory, ...).
    pub kind: u8,
    /// Mode bits.
    pub mode: u32,
    /// The size field (the data written may differ).
    pub size: Option<u64>,
    /// Link target.
    pub link: Vec<u8>,
    /// Data after the header (padded to 512).
    pub data: Vec<u8>,
    /// Device major and minor.
    pub dev: (u32, u32),
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0width$o}", v, width = field.len() - 1);
    let b = s.as_bytes();
    let b = &b[b.len().saturating_sub(field.len() - 1)..];
    field[..b.len()].copy_from_slice(b);
    field[b.len()] = 0;
}

/// One entry's header and data.
pub fn raw_entry(e: &RawEntry) -> Vec<u8> {
    let mut h = [0u8; 512];
    let n = e.name.len().min(100);
    h[..n].copy_from_slice(&e.name[..n]);
    octal(&mut h[100..108], u64::from(e.mode));
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], e.size.unwrap_or(e.data.len() as u64));
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = e.kind;
    let l = e.link.len().min(100);
    h[157..157 + l].copy_from_slice(&e.link[..l]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], u64::from(e.dev.0));
    octal(&mut h[337..345], u64::from(e.dev.1));
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    octal(&mut h[148..155], u64::from(sum));
    h[155] = b' ';
    let mut out = h.to_vec();
    out.extend_from_slice(&e.data);
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

/// A tar of these entries, with its two end blocks.
pub fn raw_tar(entries: &[RawEntry]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.iter().flat_map(raw_entry).collect();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn file(name: &str, data: &[u8]) -> RawEntry {
    RawEntry {
        name: name.into(),
        kind: b'0',
        mode: 0o644,
        data: data.to_vec(),
        ..RawEntry::default()
    }
}

fn link(name: &str, kind: u8, target: &str) -> RawEntry {
    RawEntry {
        name: name.into(),
        kind,
        mode: 0o777,
        link: target.into(),
        ..RawEntry::default()
    }
}

fn dir(name: &str) -> RawEntry {
    RawEntry {
        name: name.into(),
        kind: b'5',
        mode: 0o755,
        ..RawEntry::default()
    }
}

fn pax(records: &[(&str, &[u8])]) -> RawEntry {
    let mut data = Vec::new();
    for (k, v) in records {
        let body_len = 1 + k.len() + 1 + v.len() + 1;
        let mut len = body_len + 1;
        while format!("{len}").len() + body_len != len {
            len += 1;
        }
        data.extend_from_slice(format!("{len} {k}=").as_bytes());
        data.extend_from_slice(v);
        data.push(b'\n');
    }
    RawEntry {
        name: b"PaxHeaders/x".to_vec(),
        kind: b'x',
        mode: 0o644,
        data,
        ..RawEntry::default()
    }
}

/// gzip of `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// zstd of `data`.
pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 19).expect("zstd")
}

fn image() -> ImageFixture {
    ImageFixture::new()
        .layer(vec![
            FixtureEntry::dir("etc"),
            FixtureEntry::file("etc/motd", "one"),
            FixtureEntry::File {
                path: "bin/tool".into(),
                data: b"#!/bin/sh\n".to_vec(),
                mode: 0o4755,
                uid: 1000,
                gid: 1000,
            },
            FixtureEntry::symlink("bin/sh", "tool"),
            FixtureEntry::hard_link("bin/tool2", "bin/tool"),
            FixtureEntry::Dir {
                path: "locked".into(),
                mode: 0o500,
            },
        ])
        .layer(vec![
            FixtureEntry::file("etc/motd", "two"),
            FixtureEntry::whiteout("bin/tool"),
            FixtureEntry::opaque("etc"),
        ])
        .env("PATH", "/usr/bin:/bin")
        .workdir("/srv")
        .entrypoint(&["/bin/sh", "-c"])
        .cmd(&["echo hi"])
        .user("1000:1000")
        .tag("demo:1")
}

/// Seeds of the `layer` target.
pub fn layer_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, tar) in image()
        .layer_tars()
        .expect("fixture")
        .into_iter()
        .enumerate()
    {
        out.push((format!("fixture-{i}-gzip"), gzip(&tar)));
        out.push((format!("fixture-{i}-zstd"), zstd(&tar)));
        out.push((format!("fixture-{i}"), tar));
    }
    let long = "d/".repeat(60) + "file";
    let hostile: Vec<(&str, Vec<RawEntry>)> = vec![
        ("dotdot", vec![file("../escape", b"x")]),
        ("absolute", vec![file("/abs", b"x")]),
        (
            "symlink-root",
            vec![link("a", b'2', "/"), file("a/x", b"x")],
        ),
        ("symlink-up", vec![link("b", b'2', ".."), file("b/x", b"x")]),
        (
            "symlink-then-dir",
            vec![link("c", b'2', "/tmp"), dir("c/sub")],
        ),
        ("hardlink-out", vec![link("h", b'1', "../../etc/passwd")]),
        (
            "hardlink-symlink",
            vec![link("s", b'2', "/etc/passwd"), link("h", b'1', "s")],
        ),
        (
            "devices",
            vec![
                RawEntry {
                    name: b"null".to_vec(),
                    kind: b'3',
                    dev: (1, 3),
                    mode: 0o666,
                    ..RawEntry::default()
                },
                RawEntry {
                    name: b"sda".to_vec(),
                    kind: b'4',
                    dev: (8, 0),
                    mode: 0o660,
                    ..RawEntry::default()
                },
                link("null2", b'1', "null"),
                RawEntry {
                    name: b"fifo".to_vec(),
                    kind: b'6',
                    mode: 0o644,
                    ..RawEntry::default()
                },
                RawEntry {
                    name: b"wh".to_vec(),
                    kind: b'3',
                    ..RawEntry::default()
                },
            ],
        ),
        (
            "whiteouts",
            vec![
                file(".wh..wh..opq", b""),
                file("d/.wh.gone", b""),
                file(".wh..wh.plnk", b""),
                file("x/.wh..", b""),
            ],
        ),
        (
            "xattrs",
            vec![
                pax(&[
                    ("SCHILY.xattr.user.x", b"1"),
                    ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
                    ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                    ("SCHILY.xattr.user.overlay.redirect", b"/etc"),
                    ("path", b"pax/long/name/from/pax"),
                ]),
                file("ignored-name", b"data"),
            ],
        ),
        (
            "longname",
            vec![
                RawEntry {
                    name: b"././@LongLink".to_vec(),
                    kind: b'L',
                    data: long.as_bytes().to_vec(),
                    ..RawEntry::default()
                },
                file("short", b"x"),
            ],
        ),
        (
            "replace",
            vec![
                dir("p"),
                file("p/f", b"1"),
                file("p", b"file over a directory"),
                dir("p"),
                link("q", b'2', "p"),
                dir("q"),
            ],
        ),
        (
            "truncated",
            vec![RawEntry {
                size: Some(100_000),
                ..file("big", b"short")
            }],
        ),
        (
            "huge-size",
            vec![RawEntry {
                size: Some(0o77_777_777_777),
                ..file("huge", b"")
            }],
        ),
        ("root-file", vec![file(".", b"x")]),
        (
            "unknown-type",
            vec![link("k", b'Z', "x"), link("k2", b'1', "k")],
        ),
    ];
    for (name, entries) in hostile {
        out.push((format!("hostile-{name}"), raw_tar(&entries)));
    }
    // An old GNU sparse entry: 1 MiB real size, 512 bytes of data at offset 0.
    let mut sparse = raw_entry(&RawEntry {
        kind: b'S',
        size: Some(512),
        ..file("sparse", &[7u8; 512])
    });
    octal(&mut sparse[386..398], 0);
    octal(&mut sparse[398..410], 512);
    octal(&mut sparse[483..495], 1 << 20);
    sparse[148..156].copy_from_slice(b"        ");
    let sum: u32 = sparse[..512].iter().map(|b| u32::from(*b)).sum();
    octal(&mut sparse[148..155], u64::from(sum));
    sparse[155] = b' ';
    sparse.extend_from_slice(&[0u8; 1024]);
    out.push(("hostile-sparse".into(), sparse));
    out
}

/// Seeds of the `archive` target (each prefixed with the mode byte).
pub fn archive_seeds() -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut out = Vec::new();
    let write = |f: &dyn Fn(&std::path::Path) -> std::io::Result<()>| -> Vec<u8> {
        let p = dir.path().join("a.tar");
        f(&p).expect("fixture archive");
        std::fs::read(&p).expect("read archive")
    };
    let small = ImageFixture::new()
        .layer(vec![FixtureEntry::file("hello", "hi\n")])
        .tag("small:1");
    let archives = [
        ("oci", write(&|p| image().write_oci_archive(p))),
        (
            "oci-gzip-layers",
            write(&|p| image().gzip(true).write_oci_archive(p)),
        ),
        ("docker", write(&|p| small.write_docker_archive(p))),
        ("oci-small", write(&|p| small.write_oci_archive(p))),
        (
            "oci-arm64",
            write(&|p| small.clone().architecture("arm64").write_oci_archive(p)),
        ),
    ];
    for (name, bytes) in archives {
        out.push((format!("{name}-import"), [&[1u8][..], &bytes].concat()));
        if name == "docker" || name == "oci-small" {
            out.push((format!("{name}-gzip"), [&[0u8][..], &gzip(&bytes)].concat()));
        }
        out.push((name.to_string(), [&[0u8][..], &bytes].concat()));
    }
    // Outer tars with odd members: links between members, a link out, a missing index.
    let index = br#"{"schemaVersion":2,"manifests":[]}"#;
    let odd = raw_tar(&[
        file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        link("index.json", b'2', "real/index.json"),
        file("real/index.json", index),
        link("blobs/sha256/aa", b'2', "../../../outside"),
        link("manifest.json", b'1', "index.json"),
    ]);
    out.push(("odd-members".into(), [&[1u8][..], &odd].concat()));
    let docker = raw_tar(&[
        file(
            "manifest.json",
            br#"[{"Config":"c.json","RepoTags":["x:1"],"Layers":["l/layer.tar","../l.tar"]}]"#,
        ),
        file("c.json", br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#),
        file("l/layer.tar", &raw_tar(&[file("f", b"x")])),
    ]);
    out.push(("docker-hand".into(), [&[1u8][..], &docker].concat()));
    out
}

//! Snapshots end to end: a sandbox on an image from an OCI archive writes a file and
//! deletes one of the image's, stops, and is snapshotted (a running one is refused); two
//! new sandboxes boot from the snapshot at once, each sees its files and changes only its
//! own copy; the snapshot is exported with the image's blobs, everything (sandboxes,
//! snapshot, image, its layers) is removed, the export is imported and a sandbox boots
//! from it as on a machine that never had the image.

use std::path::Path;
use std::time::{Duration, Instant};

use microsandbox::image::fixture::{FixtureEntry, ImageFixture};
use microsandbox::{ExportOptions, Image, MicrosandboxError, PullPolicy, Sandbox, Snapshot};
use msb_e2e::{busybox_layer, host_kind, sdk_env, sh};

const IMAGE: &str = "127.0.0.1:1/snaptest:1";

fn check(name: &str, start: Instant) {
    msb_e2e::check("snapshots", name, start);
}

#[test]
fn snapshots() {
    let home = tempfile::tempdir().expect("tempdir");
    sdk_env(home.path());
    msb_e2e::block_on_within(Duration::from_secs(1800), run_all(home.path()));
}

async fn boot(name: &str, snapshot: &str) -> Sandbox {
    Sandbox::builder(name)
        .snapshot(snapshot)
        .create()
        .await
        .unwrap_or_else(|e| panic!("{name} boots from {snapshot}: {e}"))
}

async fn run_all(home: &Path) {
    eprintln!("snapshots e2e: host kind {}", host_kind());
    let work = tempfile::tempdir().expect("tempdir");
    let archive = work.path().join("image.tar");
    ImageFixture::new()
        .layer(busybox_layer())
        .layer(vec![
            FixtureEntry::dir("etc"),
            FixtureEntry::file("etc/snap-marker", "from the image\n"),
        ])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("FROM_IMAGE", "yes")
        .write_oci_archive(&archive)
        .expect("archive");
    Image::load(&archive, Some(IMAGE)).await.expect("load");

    let t = Instant::now();
    let src = Sandbox::builder("snap-src")
        .image(IMAGE)
        .pull_policy(PullPolicy::Never)
        .create()
        .await
        .expect("boots");
    let (code, text) = sh(
        &src,
        "mkdir -p /app && echo original > /app/state.txt && rm /etc/snap-marker && sync",
    )
    .await;
    assert_eq!(code, 0, "{text}");
    let handle = Sandbox::get("snap-src").await.expect("get");
    match handle.snapshot("refused").await {
        Err(MicrosandboxError::StillRunning(m)) => assert!(m.contains("stop it"), "{m}"),
        other => panic!("a running sandbox was snapshotted: {other:?}"),
    }
    src.stop_and_wait().await.expect("stop");
    let art = handle
        .snapshot("snap1")
        .await
        .expect("snapshot a stopped sandbox");
    assert_eq!(art.source_sandbox, "snap-src");
    assert_eq!(art.image, IMAGE);
    assert!(art
        .image_digest
        .as_deref()
        .is_some_and(|d| d.starts_with("sha256:")));
    assert!(art.digest.starts_with("sha256:") && art.size_bytes > 0);
    assert_eq!(
        Snapshot::get("snap1").await.expect("get").digest,
        art.digest
    );
    let listed = Snapshot::list().await.expect("list");
    assert_eq!(
        listed.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        ["snap1"]
    );
    eprintln!(
        "snapshots e2e: snap1 {} bytes, digest {}, image {}@{}",
        art.size_bytes,
        art.digest,
        art.image,
        art.image_digest.as_deref().unwrap_or("-")
    );
    check("a stopped sandbox is snapshotted, a running one refused", t);

    let t = Instant::now();
    let e = Sandbox::builder("snap-both")
        .image(IMAGE)
        .snapshot("snap1")
        .create()
        .await
        .expect_err("image and snapshot together");
    assert!(e.to_string().contains("mutually exclusive"), "{e}");
    let (a, b) = tokio::join!(boot("snap-a", "snap1"), boot("snap-b", "snap1"));
    for sb in [&a, &b] {
        let (code, text) = sh(
            sb,
            "cat /app/state.txt; ls /etc/snap-marker 2>&1 || echo gone; echo $FROM_IMAGE",
        )
        .await;
        assert_eq!(code, 0, "{text}");
        assert!(text.starts_with("original\n"), "{text}");
        assert!(
            text.contains("gone"),
            "the deletion is in the snapshot: {text}"
        );
        assert!(text.ends_with("yes\n"), "the image's env: {text}");
    }
    let (code, text) = sh(&a, "echo changed-by-a > /app/state.txt; cat /app/state.txt").await;
    assert_eq!((code, text.as_str()), (0, "changed-by-a\n"));
    let (code, text) = sh(&b, "cat /app/state.txt").await;
    assert_eq!(
        (code, text.as_str()),
        (0, "original\n"),
        "b keeps its own copy"
    );
    check(
        "two sandboxes boot from one snapshot, each changes only its own copy",
        t,
    );

    let t = Instant::now();
    a.stop_and_wait().await.expect("stop a");
    b.stop_and_wait().await.expect("stop b");
    let file = work.path().join("snap1.tar.zst");
    Snapshot::export("snap1", &file, ExportOptions { with_image: true })
        .await
        .expect("export with the image");
    for name in ["snap-src", "snap-a", "snap-b"] {
        Sandbox::remove(name).await.expect("remove");
    }
    Snapshot::remove("snap1")
        .await
        .expect("remove the snapshot");
    Image::remove(IMAGE).await.expect("remove the image");
    Image::prune().await.expect("prune");
    assert!(Snapshot::list().await.expect("list").is_empty());
    let layers = std::fs::read_dir(home.join("layers/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(layers, 0, "nothing of the image is left");
    let imported = Snapshot::import(&file, None).await.expect("import");
    assert_eq!(imported.name, "snap1");
    assert_eq!(imported.digest, art.digest, "the same artifact");
    let c = boot("snap-c", "snap1").await;
    let (code, text) = sh(
        &c,
        "cat /app/state.txt; ls /etc/snap-marker 2>&1 || echo gone",
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("original\n") && text.contains("gone"),
        "{text}"
    );
    c.stop_and_wait().await.expect("stop");
    Sandbox::remove("snap-c").await.expect("remove");
    check("export with the image, remove everything, import, boot", t);
}

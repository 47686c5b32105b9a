//! Images from an OCI registry, end to end: a real registry (Debian's `docker-registry`)
//! started on 127.0.0.1 with temporary storage, images this test builds and pushes, and
//! pulls through the SDK and the `msb` CLI: each pull policy, progress events, a
//! multi-platform index, typed errors (not found, unreachable, HTTPS-only, unauthorized,
//! digest mismatch), concurrent pulls sharing one download, a pull killed midway and
//! resumed, store management, and a sandbox booted from a pulled image. Nothing here
//! talks to any other registry.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use microsandbox::image::fixture::{FixtureEntry, ImageFixture};
use microsandbox::{Image, MicrosandboxError, PullEvent, PullOptions, PullPolicy, RegistryAuth};
use msb_e2e::registry::{free_port, Registry, SlowProxy};
use msb_e2e::{block_on_within, busybox_layer, check, host_kind, msb_cli, noise, sdk_env};

const SUITE: &str = "registry";

/// An image of `layers` layers, layer `i` holding `data/<i>` of `sizes[i]` noise bytes.
fn image(seed: u64, sizes: &[usize]) -> ImageFixture {
    let mut img = ImageFixture::new().env("FROM_IMAGE", &format!("seed-{seed}"));
    for (i, size) in sizes.iter().enumerate() {
        img = img.layer(vec![
            FixtureEntry::dir("data"),
            FixtureEntry::file(&format!("data/{i}"), noise(seed * 10 + i as u64, *size)),
        ]);
    }
    img
}

fn opts(reg: &str) -> PullOptions {
    PullOptions::new().insecure_registry(reg)
}

/// Layer blob sizes of a fixture, bottom first.
fn layer_sizes(img: &ImageFixture) -> Vec<u64> {
    img.blobs()
        .expect("blobs")
        .layers
        .iter()
        .map(|(_, b, _)| b.len() as u64)
        .collect()
}

async fn pull_events(
    reference: &str,
    opts: PullOptions,
) -> (
    Vec<PullEvent>,
    Result<microsandbox::ImageInfo, MicrosandboxError>,
) {
    let mut session = Image::pull_with_progress(reference, opts);
    let mut events = Vec::new();
    while let Some(e) = session.next_event().await {
        events.push(e);
    }
    (events, session.result().await)
}

/// Checks the order and the byte counts of a full pull's events.
fn check_progress(events: &[PullEvent], reference: &str, sizes: &[u64]) {
    let names: Vec<_> = events.iter().map(|e| e.event_type()).collect();
    assert!(
        matches!(&events[0], PullEvent::Resolving { reference: r } if r == reference),
        "{names:?}"
    );
    match &events[1] {
        PullEvent::Resolved {
            layer_count,
            total_download_bytes,
            ..
        } => {
            assert_eq!(*layer_count, sizes.len());
            assert_eq!(*total_download_bytes, sizes.iter().sum::<u64>());
        }
        other => panic!("second event {other:?}"),
    }
    assert!(
        matches!(events.last(), Some(PullEvent::Complete { layer_count, .. }) if *layer_count == sizes.len()),
        "{names:?}"
    );
    for (index, size) in sizes.iter().enumerate() {
        let at = |pred: &dyn Fn(&PullEvent) -> bool| {
            events
                .iter()
                .position(pred)
                .unwrap_or_else(|| panic!("layer {index}: missing event in {names:?}"))
        };
        let mut last = 0;
        let mut last_progress = 0;
        for (pos, e) in events.iter().enumerate() {
            if let PullEvent::LayerDownloadProgress {
                layer_index,
                downloaded_bytes,
                total_bytes,
                ..
            } = e
            {
                if *layer_index == index {
                    assert_eq!(total_bytes, size);
                    assert!(*downloaded_bytes >= last && downloaded_bytes <= size);
                    last = *downloaded_bytes;
                    last_progress = pos;
                }
            }
        }
        assert_eq!(last, *size, "layer {index}: progress ends at the blob size");
        let complete = at(&|e| {
            matches!(e, PullEvent::LayerDownloadComplete { layer_index, downloaded_bytes, .. }
                if *layer_index == index && downloaded_bytes == size)
        });
        let verifying = at(
            &|e| matches!(e, PullEvent::LayerDownloadVerifying { layer_index, .. } if *layer_index == index),
        );
        let started = at(
            &|e| matches!(e, PullEvent::LayerMaterializeStarted { layer_index, .. } if *layer_index == index),
        );
        let done = at(
            &|e| matches!(e, PullEvent::LayerMaterializeComplete { layer_index, .. } if *layer_index == index),
        );
        assert!(
            last_progress < complete
                && complete < verifying
                && verifying < started
                && started < done,
            "layer {index}: order in {names:?}"
        );
    }
}

/// The blob store's partial downloads.
fn partials(home: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(home.join("images/downloads"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "partial"))
                .collect()
        })
        .unwrap_or_default()
}

fn stored(home: &Path, digest: &str) -> bool {
    home.join("images/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
        .exists()
}

#[test]
fn registry_images() {
    let home = tempfile::tempdir().expect("home");
    let home = home.path().to_path_buf();
    sdk_env(&home);
    // No credentials of whoever runs the tests, no other insecure hosts.
    std::env::set_var("DOCKER_CONFIG", home.join("docker"));
    std::env::remove_var("MSB_INSECURE_REGISTRIES");
    eprintln!("{SUITE} e2e: host kind: {}", host_kind());
    block_on_within(Duration::from_secs(1500), async {
        let reg = Registry::start(None);
        policies_and_progress(&reg, &home).await;
        errors_and_platforms(&reg, &home).await;
        concurrent_pulls_share_downloads(&reg).await;
        tampered_blob(&reg, &home).await;
        registry_auth(&home).await;
        killed_pull_resumes(&reg, &home).await;
        cli_images(&reg, &home).await;
        sandbox_from_pulled_image(&reg).await;
    });
}

async fn policies_and_progress(reg: &Registry, home: &Path) {
    let t = Instant::now();
    let img = image(1, &[900_000, 1_300_000]).gzip(true);
    let digest = reg.push("test/app", "1", &img);
    let reference = format!("{}/test/app:1", reg.addr);
    let sizes = layer_sizes(&img);

    // never, before any pull: typed error, nothing fetched.
    let e = Image::pull(&reference, &opts(&reg.addr).policy(PullPolicy::Never))
        .await
        .expect_err("never with an empty store");
    assert!(
        matches!(&e, MicrosandboxError::ImageNotCached(r) if *r == reference),
        "{e:?}"
    );
    assert_eq!(reg.gets("test/app", "manifests", "1"), 0);

    // if-missing (the default) pulls, with progress in order and exact byte counts.
    let (events, info) = pull_events(&reference, opts(&reg.addr)).await;
    let info = info.expect("pull");
    assert_eq!(info.digest, digest);
    assert_eq!(info.layer_count, 2);
    check_progress(&events, &reference, &sizes);
    let blobs = img.blobs().expect("blobs");
    for (d, _, _) in &blobs.layers {
        assert_eq!(reg.gets("test/app", "blobs", d), 1, "{}", reg.access_log());
        assert!(stored(home, d));
    }
    // The layers are unpacked: the files are there, byte for byte.
    let details = Image::inspect(&reference).await.expect("inspect");
    assert_eq!(details.layers.len(), 2);
    assert_eq!(
        details.env,
        vec![("FROM_IMAGE".to_string(), "seed-1".to_string())]
    );
    let diff_ids = img.diff_ids().expect("diff ids");
    for (i, layer) in details.layers.iter().enumerate() {
        assert_eq!(layer.diff_id, diff_ids[i]);
        let dir = layer.path.as_ref().expect("unpacked");
        let data = std::fs::read(dir.join(format!("data/{i}"))).expect("layer file");
        assert_eq!(data, noise(10 + i as u64, [900_000, 1_300_000][i]));
    }
    check(
        SUITE,
        "if-missing pulls, progress in order with exact bytes",
        t,
    );

    // if-missing again: the store has it, the registry is not asked.
    let t = Instant::now();
    let manifests_before = reg.gets("test/app", "manifests", "1");
    let (events, info) = pull_events(&reference, opts(&reg.addr)).await;
    info.expect("cached");
    let names: Vec<_> = events.iter().map(|e| e.event_type()).collect();
    assert_eq!(names, ["resolving", "resolved", "complete"]);
    assert!(matches!(
        &events[1],
        PullEvent::Resolved {
            total_download_bytes: 0,
            ..
        }
    ));
    assert_eq!(reg.gets("test/app", "manifests", "1"), manifests_before);
    // never now works from the store.
    Image::pull(&reference, &opts(&reg.addr).policy(PullPolicy::Never))
        .await
        .expect("never with the image stored");
    assert_eq!(reg.gets("test/app", "manifests", "1"), manifests_before);
    // always asks the registry again but downloads no blob it has.
    Image::pull(&reference, &opts(&reg.addr).policy(PullPolicy::Always))
        .await
        .expect("always");
    assert_eq!(reg.gets("test/app", "manifests", "1"), manifests_before + 1);
    for (d, _, _) in &blobs.layers {
        assert_eq!(reg.gets("test/app", "blobs", d), 1);
    }
    check(SUITE, "if-missing cached, never, always", t);

    // zstd layers.
    let t = Instant::now();
    let z = image(2, &[300_000]).zstd(true);
    reg.push("test/zstd", "1", &z);
    let zref = format!("{}/test/zstd:1", reg.addr);
    Image::pull(&zref, &opts(&reg.addr))
        .await
        .expect("zstd pull");
    let d = Image::inspect(&zref).await.expect("inspect");
    assert!(
        d.layers[0].media_type.ends_with("+zstd"),
        "{:?}",
        d.layers[0]
    );
    let path = d.layers[0].path.as_ref().expect("unpacked");
    assert_eq!(
        std::fs::read(path.join("data/0")).expect("file"),
        noise(20, 300_000)
    );
    let listed: Vec<_> = Image::list()
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert_eq!(listed, [reference.clone(), zref]);
    check(SUITE, "zstd layers, list", t);
}

async fn errors_and_platforms(reg: &Registry, _home: &Path) {
    let t = Instant::now();
    // A multi-platform index: this host's manifest is chosen, the other is not fetched.
    let amd = image(3, &[200_000]);
    let arm = image(4, &[200_000]).architecture("arm64");
    let index_digest = reg.push_index("test/multi", "1", &[("amd64", &amd), ("arm64", &arm)]);
    let reference = format!("{}/test/multi:1", reg.addr);
    let info = Image::pull(&reference, &opts(&reg.addr))
        .await
        .expect("index pull");
    assert_eq!(info.digest, amd.manifest_digest().expect("digest"));
    assert_eq!(info.index_digest.as_deref(), Some(index_digest.as_str()));
    let arm_layer = &arm.blobs().expect("blobs").layers[0].0;
    assert_eq!(reg.gets("test/multi", "blobs", arm_layer), 0);
    // By digest.
    let by_digest = format!(
        "{}/test/multi@{}",
        reg.addr,
        amd.manifest_digest().expect("digest")
    );
    let info = Image::pull(&by_digest, &opts(&reg.addr))
        .await
        .expect("pull by digest");
    assert_eq!(info.reference, by_digest);
    check(SUITE, "index resolves to linux/amd64; pull by digest", t);

    let t = Instant::now();
    let missing = format!("{}/test/nope:1", reg.addr);
    let e = Image::pull(&missing, &opts(&reg.addr))
        .await
        .expect_err("unknown repository");
    assert!(matches!(e, MicrosandboxError::ImageNotFound(_)), "{e:?}");
    let e = Image::pull(
        &format!("{}/test/app:nosuchtag", reg.addr),
        &opts(&reg.addr),
    )
    .await
    .expect_err("unknown tag");
    assert!(matches!(e, MicrosandboxError::ImageNotFound(_)), "{e:?}");
    // Plain HTTP only when allowed for the host: HTTPS to this registry fails.
    let e = Image::pull(
        &format!("{}/test/app:1", reg.addr),
        &PullOptions::new().policy(PullPolicy::Always),
    )
    .await
    .expect_err("HTTPS to an HTTP registry");
    assert!(
        matches!(e, MicrosandboxError::RegistryUnreachable { .. }),
        "{e:?}"
    );
    // Nothing listens there.
    let closed = format!("127.0.0.1:{}", free_port());
    let e = Image::pull(&format!("{closed}/test/app:1"), &opts(&closed))
        .await
        .expect_err("nothing listening");
    assert!(
        matches!(e, MicrosandboxError::RegistryUnreachable { .. }),
        "{e:?}"
    );
    let e = Image::pull("Not A Reference", &opts(&reg.addr))
        .await
        .expect_err("bad reference");
    assert!(
        matches!(e, MicrosandboxError::InvalidReference { .. }),
        "{e:?}"
    );
    check(
        SUITE,
        "typed errors: not found, HTTPS only, unreachable, bad reference",
        t,
    );
}

async fn concurrent_pulls_share_downloads(reg: &Registry) {
    let t = Instant::now();
    let img = image(5, &[2_000_000, 1_500_000]);
    reg.push("test/concurrent", "1", &img);
    let reference = format!("{}/test/concurrent:1", reg.addr);
    let o = opts(&reg.addr);
    let (a, b, c) = tokio::join!(
        Image::pull(&reference, &o),
        Image::pull(&reference, &o),
        Image::pull(&reference, &o)
    );
    let (a, b, c) = (a.expect("a"), b.expect("b"), c.expect("c"));
    assert_eq!(a.digest, b.digest);
    assert_eq!(b.digest, c.digest);
    for (d, _, _) in &img.blobs().expect("blobs").layers {
        assert_eq!(
            reg.gets("test/concurrent", "blobs", d),
            1,
            "three concurrent pulls download each layer once:\n{}",
            reg.access_log()
        );
    }
    check(SUITE, "three concurrent pulls, one download per layer", t);
}

async fn tampered_blob(reg: &Registry, home: &Path) {
    let t = Instant::now();
    let img = image(6, &[400_000]).gzip(true);
    reg.push("test/tampered", "1", &img);
    let layer = img.blobs().expect("blobs").layers[0].0.clone();
    let file = reg.blob_file(&layer);
    let mut bytes = std::fs::read(&file).expect("registry blob");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, bytes).expect("tamper");
    let reference = format!("{}/test/tampered:1", reg.addr);
    let e = Image::pull(&reference, &opts(&reg.addr))
        .await
        .expect_err("tampered layer");
    match &e {
        MicrosandboxError::DigestMismatch { expected, .. } => assert_eq!(*expected, layer),
        other => panic!("{other:?}"),
    }
    // Nothing of it is kept: no blob, no partial download, no layer, no image.
    assert!(!stored(home, &layer));
    assert!(partials(home).is_empty(), "{:?}", partials(home));
    let diff_id = &img.diff_ids().expect("diff ids")[0];
    assert!(!home
        .join("layers/sha256")
        .join(diff_id.trim_start_matches("sha256:"))
        .exists());
    let e = Image::get(&reference).await.expect_err("not recorded");
    assert!(matches!(e, MicrosandboxError::ImageNotCached(_)), "{e:?}");
    check(SUITE, "tampered blob: DigestMismatch, nothing stored", t);
}

async fn registry_auth(home: &Path) {
    let t = Instant::now();
    let reg = Registry::start(Some(("tester", "s3cret-pass")));
    let img = image(7, &[100_000]);
    reg.push("private/app", "1", &img);
    let reference = format!("{}/private/app:1", reg.addr);
    let e = Image::pull(&reference, &opts(&reg.addr))
        .await
        .expect_err("no credentials");
    assert!(
        matches!(e, MicrosandboxError::RegistryUnauthorized { .. }),
        "{e:?}"
    );
    let e = Image::pull(
        &reference,
        &opts(&reg.addr).auth(RegistryAuth::basic("tester", "wrong")),
    )
    .await
    .expect_err("wrong password");
    assert!(
        matches!(e, MicrosandboxError::RegistryUnauthorized { .. }),
        "{e:?}"
    );
    let info = Image::pull(
        &reference,
        &opts(&reg.addr).auth(RegistryAuth::basic("tester", "s3cret-pass")),
    )
    .await
    .expect("right password");
    assert_eq!(info.digest, img.manifest_digest().expect("digest"));
    // The CLI's credentials go to MSB_REGISTRY_HOST only.
    let cli_pull = |host: &str| {
        Command::new(msb_cli())
            .args(["pull", "--insecure-registry", &reg.addr, &reference])
            .env("MSB_REGISTRY_USERNAME", "tester")
            .env("MSB_REGISTRY_PASSWORD", "s3cret-pass")
            .env("MSB_REGISTRY_HOST", host)
            .output()
            .expect("msb pull")
    };
    let elsewhere = cli_pull("127.0.0.1:1");
    let said = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        !elsewhere.status.success() && said.contains("refused access"),
        "{said}"
    );
    let here = cli_pull(&reg.addr);
    assert!(
        here.status.success(),
        "{}",
        String::from_utf8_lossy(&here.stderr)
    );
    check(SUITE, "auth: missing and wrong refused, given accepted", t);

    // Credentials from the docker config (DOCKER_CONFIG points into the test's home).
    let t = Instant::now();
    let img2 = image(8, &[100_000]);
    reg.push("private/other", "1", &img2);
    let dir = home.join("docker");
    std::fs::create_dir_all(&dir).expect("docker config dir");
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode("tester:s3cret-pass");
    std::fs::write(
        dir.join("config.json"),
        format!(r#"{{"auths": {{"{}": {{"auth": "{token}"}}}}}}"#, reg.addr),
    )
    .expect("docker config");
    let other = format!("{}/private/other:1", reg.addr);
    Image::pull(&other, &opts(&reg.addr))
        .await
        .expect("credentials from config.json");
    std::fs::remove_file(dir.join("config.json")).expect("rm config");
    check(SUITE, "auth: credentials from ~/.docker/config.json", t);
}

async fn killed_pull_resumes(reg: &Registry, home: &Path) {
    let t = Instant::now();
    let size = 6_000_000;
    let img = image(9, &[size]);
    reg.push("test/big", "1", &img);
    let layer = img.blobs().expect("blobs").layers[0].clone();
    let proxy = SlowProxy::start(&reg.addr, 1_000_000);
    let reference = format!("{}/test/big:1", proxy.addr);
    // msb pull in a child, killed with SIGKILL once it has part of the layer.
    let err_log = home.join("pull-killed.err");
    let mut child = Command::new(msb_cli())
        .args(["pull", "--insecure-registry", &proxy.addr, &reference])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_log).expect("log"))
        .spawn()
        .expect("msb pull");
    let partial = home
        .join("images/downloads")
        .join(format!("{}.partial", layer.0.trim_start_matches("sha256:")));
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < 1_000_000 {
        assert!(Instant::now() < deadline, "the pull made no progress");
        assert!(
            child.try_wait().expect("wait").is_none(),
            "msb pull ended early"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let had = std::fs::metadata(&partial).expect("partial kept").len();
    assert!(had < layer.1.len() as u64, "{had}");
    // No corrupt layer behind: no blob, no unpacked layer, no image.
    assert!(!stored(home, &layer.0));
    let diff_id = &img.diff_ids().expect("diff ids")[0];
    assert!(!home
        .join("layers/sha256")
        .join(diff_id.trim_start_matches("sha256:"))
        .exists());
    assert!(Image::get(&reference).await.is_err());
    let said = std::fs::read_to_string(&err_log).unwrap_or_default();
    assert!(said.contains("to download"), "msb pull progress: {said}");

    // The next pull resumes from what the killed one had.
    let before = proxy.bytes.load(Ordering::Relaxed);
    let (events, info) = pull_events(&reference, opts(&proxy.addr)).await;
    info.expect("resumed pull");
    let first = events
        .iter()
        .find_map(|e| match e {
            PullEvent::LayerDownloadProgress {
                downloaded_bytes, ..
            } => Some(*downloaded_bytes),
            _ => None,
        })
        .expect("progress");
    assert!(first >= had, "resumed at {first}, the partial had {had}");
    let fetched = proxy.bytes.load(Ordering::Relaxed) - before;
    assert!(
        fetched < layer.1.len() as u64,
        "the resumed pull moved {fetched} bytes for a {} byte layer",
        layer.1.len()
    );
    assert!(stored(home, &layer.0));
    assert!(!partial.exists());
    let d = Image::inspect(&reference).await.expect("inspect");
    let path = d.layers[0].path.as_ref().expect("unpacked");
    assert_eq!(
        std::fs::read(path.join("data/0")).expect("file"),
        noise(90, size)
    );
    eprintln!(
        "{SUITE} e2e: killed at {had} of {} bytes; the resumed pull moved {fetched} bytes",
        layer.1.len()
    );
    check(
        SUITE,
        "a killed pull leaves no layer; the next resumes it",
        t,
    );
}

fn msb(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(msb_cli()).args(args).output().expect("msb");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn cli_images(reg: &Registry, home: &Path) {
    let t = Instant::now();
    let img = image(11, &[500_000]).gzip(true);
    let digest = reg.push("test/cli", "1", &img);
    let reference = format!("{}/test/cli:1", reg.addr);
    let (ok, stdout, stderr) = msb(&["pull", "--insecure-registry", &reg.addr, &reference]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), format!("{reference} {digest}"));
    assert!(
        stderr.contains("to download") && stderr.contains("complete"),
        "{stderr}"
    );
    let (ok, stdout, _) = msb(&["image", "ls"]);
    assert!(ok);
    assert!(stdout.starts_with("REFERENCE"), "{stdout}");
    assert!(stdout.contains(&reference), "{stdout}");
    let (ok, stdout, stderr) = msb(&["image", "inspect", &reference]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("inspect JSON");
    assert_eq!(v["info"]["digest"], digest.as_str());
    assert_eq!(v["layers"].as_array().map(Vec::len), Some(1));
    let saved = home.join("saved.tar");
    let saved_s = saved.to_string_lossy().into_owned();
    let (ok, _, stderr) = msb(&["image", "save", "-o", &saved_s, &reference]);
    assert!(ok, "{stderr}");
    // On a terminal: a bar per layer, redrawn in place.
    let tty_img = image(13, &[700_000]);
    reg.push("test/tty", "1", &tty_img);
    let tty_ref = format!("{}/test/tty:1", reg.addr);
    let cmd = format!(
        "{} pull --insecure-registry {} {tty_ref}",
        msb_cli().display(),
        reg.addr
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .expect("script");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("layer 0 sha256:") && shown.contains("[######") && shown.contains("\x1b["),
        "terminal progress: {shown:?}"
    );
    let (ok, _, stderr) = msb(&["image", "rm", &reference]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = msb(&["image", "rm", &reference]);
    assert!(
        !ok && stderr.contains("not in the local image store"),
        "{stderr}"
    );
    let layer = img.blobs().expect("blobs").layers[0].0.clone();
    assert!(stored(home, &layer));
    let (ok, stdout, stderr) = msb(&["image", "prune"]);
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("removed "), "{stdout}");
    assert!(!stored(home, &layer), "prune removes the unused layer blob");
    let diff_id = &img.diff_ids().expect("diff ids")[0];
    assert!(!home
        .join("layers/sha256")
        .join(diff_id.trim_start_matches("sha256:"))
        .exists());
    // Images still listed keep everything.
    for i in Image::list().await.expect("list") {
        Image::inspect(&i.reference)
            .await
            .unwrap_or_else(|e| panic!("{} survives prune: {e}", i.reference));
    }
    let (ok, _, stderr) = msb(&["pull", "--policy", "never", &reference]);
    assert!(
        !ok && stderr.contains("not in the local image store"),
        "{stderr}"
    );
    check(
        SUITE,
        "msb pull progress; msb image ls, inspect, rm, prune",
        t,
    );

    // The saved archive loads back: same digest, blobs and layer again.
    let t = Instant::now();
    let (ok, stdout, stderr) = msb(&["image", "load", &saved_s]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), format!("{reference} {digest}"));
    assert!(stored(home, &layer));
    let (ok, _, stderr) = msb(&["pull", "--policy", "never", &reference]);
    assert!(ok, "{stderr}");
    // A docker save tarball, named on load.
    let docker_tar = home.join("docker.tar");
    let legacy = image(12, &[100_000]).tag("legacy/app:2");
    legacy
        .write_docker_archive(&docker_tar)
        .expect("docker archive");
    let loaded = Image::load(&docker_tar, None).await.expect("docker load");
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].reference, "docker.io/legacy/app:2");
    let d = Image::inspect("legacy/app:2").await.expect("inspect");
    assert_eq!(d.layers[0].diff_id, legacy.diff_ids().expect("diff ids")[0]);
    let path = d.layers[0].path.as_ref().expect("unpacked");
    assert_eq!(
        std::fs::read(path.join("data/0")).expect("file"),
        noise(120, 100_000)
    );
    let renamed = Image::load(&docker_tar, Some("127.0.0.1:1/renamed:3"))
        .await
        .expect("tagged load");
    assert_eq!(renamed[0].reference, "127.0.0.1:1/renamed:3");
    assert_eq!(renamed[0].digest, loaded[0].digest);
    // Several images in one archive come back under their own names.
    let app = format!("{}/test/app:1", reg.addr);
    let zstd = format!("{}/test/zstd:1", reg.addr);
    let before: Vec<_> = [&app, &zstd]
        .iter()
        .map(|r| msb(&["image", "inspect", r]).1)
        .collect();
    let multi = home.join("multi.tar").to_string_lossy().into_owned();
    let (ok, _, stderr) = msb(&["image", "save", "-o", &multi, &app, &zstd]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = msb(&["image", "rm", &app, &zstd]);
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = msb(&["image", "load", &multi]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    for (r, was) in [&app, &zstd].iter().zip(&before) {
        let now: serde_json::Value =
            serde_json::from_str(&msb(&["image", "inspect", r]).1).expect("json");
        let was: serde_json::Value = serde_json::from_str(was).expect("json");
        assert_eq!(now["info"]["digest"], was["info"]["digest"], "{r}");
    }
    let (ok, _, stderr) = msb(&["image", "load", "--tag", "x/y:1", &multi]);
    assert!(!ok && stderr.contains("holds 2 images"), "{stderr}");
    check(
        SUITE,
        "msb image save and load; a docker save tarball loads",
        t,
    );
}

async fn sandbox_from_pulled_image(reg: &Registry) {
    let t = Instant::now();
    let img = ImageFixture::new()
        .layer(busybox_layer())
        .layer(vec![
            FixtureEntry::dir("etc"),
            FixtureEntry::file("etc/registry-marker", "pulled over HTTP from 127.0.0.1\n"),
        ])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("FROM_REGISTRY", "yes")
        .gzip(true);
    reg.push("test/busybox", "1", &img);
    let reference = format!("{}/test/busybox:1", reg.addr);
    let mut session = microsandbox::Sandbox::builder("from-registry")
        .image(reference.as_str())
        .insecure_registry(reg.addr.clone())
        .create_with_progress();
    let mut kinds = Vec::new();
    while let Some(e) = session.next_event().await {
        kinds.push(e.event_type());
    }
    let sb = session
        .result()
        .await
        .expect("sandbox from the pulled image");
    assert_eq!(kinds.first(), Some(&"resolving"));
    assert!(kinds.contains(&"layer_download_complete"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"complete"));
    let out = sb
        .shell("cat /etc/registry-marker; echo \"env=$FROM_REGISTRY\"")
        .await
        .expect("shell");
    assert_eq!(
        out.stdout().expect("utf8"),
        "pulled over HTTP from 127.0.0.1\nenv=yes\n"
    );
    sb.stop_and_wait().await.expect("stop");
    microsandbox::Sandbox::remove("from-registry")
        .await
        .expect("remove");
    check(SUITE, "a sandbox from the pulled image runs its command", t);

    // msb run pulls what it lacks (with progress lines) and runs a command of the image.
    let t = Instant::now();
    let img = ImageFixture::new()
        .layer(busybox_layer())
        .layer(vec![
            FixtureEntry::dir("etc"),
            FixtureEntry::file("etc/run-marker", "from msb run\n"),
        ])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .zstd(true);
    reg.push("test/busybox-run", "1", &img);
    let reference = format!("{}/test/busybox-run:1", reg.addr);
    let (ok, stdout, stderr) = msb(&[
        "run",
        "--image",
        &reference,
        "--insecure-registry",
        &reg.addr,
        "cli-from-registry",
        "--",
        "cat",
        "/etc/run-marker",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "from msb run\n");
    assert!(
        stderr.contains("to download") && stderr.contains("complete"),
        "{stderr}"
    );
    check(
        SUITE,
        "msb run pulls with progress and runs the image's file",
        t,
    );
}

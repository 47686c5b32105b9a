//! The fuzz targets' harnesses: what each target does with its input, as plain functions
//! without libFuzzer, so that the seed generator and a replay of the corpus (the `msb-fuzz`
//! binary) can call them too. `fuzz/fuzz_targets/<name>.rs` is one line calling
//! [`run`]`("<name>", data)`. Each module documents its input format and what it checks.

pub mod archive;
pub mod bytes;
pub mod fuse;
pub mod http_rewrite;
pub mod images;
pub mod jail;
pub mod layer;
pub mod mmio;
pub mod net_frame;
pub mod net_policy;
pub mod protocol_frame;
pub mod ring;
pub mod tls_hello;
pub mod vsock_tx;

/// The targets, by name.
pub const TARGETS: [&str; 10] = [
    "mmio",
    "vsock_tx",
    "fuse",
    "net_frame",
    "net_policy",
    "protocol_frame",
    "layer",
    "archive",
    "tls_hello",
    "http_rewrite",
];

/// Runs one input of target `name`; panics on a target it does not know.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "mmio" => mmio::run(data),
        "vsock_tx" => vsock_tx::run(data),
        "fuse" => fuse::run(data),
        "net_frame" => net_frame::run(data),
        "net_policy" => net_policy::run(data),
        "protocol_frame" => protocol_frame::run(data),
        "layer" => layer::run(data),
        "archive" => archive::run(data),
        "tls_hello" => tls_hello::run(data),
        "http_rewrite" => http_rewrite::run(data),
        other => panic!("no fuzz target {other:?}"),
    }
}

/// The seed corpus of target `name`: (file name, input).
pub fn seeds(name: &str) -> Vec<(String, Vec<u8>)> {
    match name {
        "mmio" => mmio::seeds(),
        "vsock_tx" => vsock_tx::seeds(),
        "fuse" => fuse::seeds(),
        "net_frame" => net_frame::seeds(),
        "net_policy" => net_policy::seeds(),
        "protocol_frame" => protocol_frame::seeds(),
        "layer" => images::layer_seeds(),
        "archive" => images::archive_seeds(),
        "tls_hello" => tls_hello::seeds(),
        "http_rewrite" => http_rewrite::seeds(),
        other => panic!("no fuzz target {other:?}"),
    }
}

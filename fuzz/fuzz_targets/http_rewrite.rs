#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| msb_fuzz::run("http_rewrite", data));

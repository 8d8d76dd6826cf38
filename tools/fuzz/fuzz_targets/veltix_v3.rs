//! Fuzz target: corerelay::protocol::check::veltix_v3 (see that module).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| corerelay::protocol::check::veltix_v3(data));

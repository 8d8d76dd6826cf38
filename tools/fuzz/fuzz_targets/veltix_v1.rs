//! Fuzz target: corerelay::protocol::check::veltix_v1 (see that module).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| corerelay::protocol::check::veltix_v1(data));

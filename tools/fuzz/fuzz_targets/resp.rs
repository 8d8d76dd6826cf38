//! Fuzz target: corerelay::protocol::check::resp (see that module).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| corerelay::protocol::check::resp(data));

//! Fuzz target: corerelay::protocol::check::ws_inflate (see that module).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| corerelay::protocol::check::ws_inflate(data));

//! Fuzz target: corerelay::protocol::check::ws_client (see that module).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| corerelay::protocol::check::ws_client(data));

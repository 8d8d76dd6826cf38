//! Fuzz target: corerelay::protocol::check::config_yaml (see that module).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| corerelay::protocol::check::config_yaml(data));

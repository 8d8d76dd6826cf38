//! Fuzz target: corerelay::protocol::check::amqp (see that module).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| corerelay::protocol::check::amqp(data));

//! corerelay's integration tests: real servers on 127.0.0.1 with ephemeral
//! ports, real clients. One binary, one module per area.

mod support;

mod admin;
mod amqp;
mod browser;
mod cluster;
mod config;
mod corpus;
mod deflate;
mod engine;
mod process;
mod rely;
mod soak;
mod sources;
mod tls;
mod veltix;
mod websocket;
mod wsgateway;
mod wsproxy;

//! Wire codecs. Sans-io: bytes in, frames or "need more" or a typed error
//! out; no sockets, no clocks, no routing.

pub mod amqp;
pub mod check;
pub mod deflate;
pub mod http;
pub mod lenprefix;
pub mod rely;
pub mod resp;
pub mod veltix;
pub mod ws;

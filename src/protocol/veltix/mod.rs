//! Veltix wire codecs, sans-io. Two incompatible formats, chosen per
//! listener: [`v1`] (the README's, v1.0.0: a 46-byte header with a SHA-256
//! of the content, no handshake) and [`v3`] (what PyPI's veltix 2.0 to
//! 3.3.0 speaks: a JSON handshake, then 15-byte "VX" frames with a CRC32
//! and a request id). All integers are big-endian in both.

pub mod v1;
pub mod v3;

/// Which Veltix wire format a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// v1.0.0, the README's format.
    V1,
    /// 2.0.0 to 3.3.0, PyPI's.
    V3,
}

/// The first message type code of the user range (0-199 are system codes).
pub const USER_TYPES: u16 = 200;

//! Small blocking client libraries, used by the chat client, the load tool
//! and the tests. Not used by the server.

pub mod rely;
pub mod veltix;

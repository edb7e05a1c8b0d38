//! The HTTP shim: reads the key, resolves the client address, checks the key's
//! allow list, and answers 401/403 or lets the request through (SPEC §5).

pub mod body;
pub mod client_ip;
pub mod decide;
pub mod h1;
pub mod outcome;
pub mod runtime;
pub mod server;
pub mod sources;
pub mod tls;
pub mod upstream;
pub mod workers;

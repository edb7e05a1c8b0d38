//! The config fragments every end-to-end scenario repeats: the datapath on the
//! lab's gateway veth under the agent's own pin path, and the metrics bind
//! where [`Agent`](crate::netns::Agent) waits for `/readyz`. Scenarios write
//! their listeners and keys around them.

use std::path::Path;

use crate::netns::{GATEWAY_IF, METRICS_BIND};

/// `datapath:` attached to [`GATEWAY_IF`] in `mode`, pinned under `pin` (the
/// agent's [`pin_path`](crate::netns::Agent::pin_path)), as one line.
#[must_use]
pub fn datapath(pin: &Path, mode: &str) -> String {
    format!(
        "datapath: {{ interfaces: [{GATEWAY_IF}], mode: {mode}, pin_path: \"{}\" }}",
        pin.display()
    )
}

/// `metrics:` at [`METRICS_BIND`], as one line.
#[must_use]
pub fn metrics() -> String {
    format!("metrics: {{ bind: \"{METRICS_BIND}\" }}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments() {
        assert_eq!(
            datapath(Path::new("/sys/fs/bpf/kf-e2e-1-0"), "tc"),
            "datapath: { interfaces: [gw0], mode: tc, pin_path: \"/sys/fs/bpf/kf-e2e-1-0\" }"
        );
        assert_eq!(metrics(), "metrics: { bind: \"127.0.0.1:9901\" }");
    }
}

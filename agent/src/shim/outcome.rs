//! What became of one request the shim answered: the contract shared by the
//! `outcome` label of `keyfence_http_requests`, the `reason` of the refusal
//! log line and the allowed/refused counts of the sources table. The labels
//! are what dashboards match on: they never change.

/// The outcome of one answered request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A valid key from an address its list allows; answered (ping, auth) or
    /// proxied with the upstream's answer.
    Allowed,
    /// A valid key from an address outside its list: the configured rejection.
    IpNotAllowed,
    /// No key, an unknown or revoked one, or one not for this listener: 401.
    InvalidKey,
    /// A report-only key from outside its list: logged, let through.
    ReportOnly,
    /// Passed, but the upstream failed or timed out (502, 504).
    UpstreamError,
    /// Refused for the request itself: several credentials, a body over the
    /// limit, a bad target (400, 413).
    BadRequest,
}

impl Outcome {
    /// Every outcome, in label order of SPEC §8.
    pub const ALL: [Self; 6] = [
        Self::Allowed,
        Self::IpNotAllowed,
        Self::InvalidKey,
        Self::ReportOnly,
        Self::UpstreamError,
        Self::BadRequest,
    ];

    /// The metric label value and log `reason`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::InvalidKey => "invalid_key",
            Self::ReportOnly => "report_only",
            Self::UpstreamError => "upstream_error",
            Self::BadRequest => "bad_request",
        }
    }

    /// Whether the sources table counts the decision as allowed. A
    /// report-only pass counts as refused: it is the refusal the key would
    /// have had, which is what an operator looks for there.
    #[must_use]
    pub const fn counts_as_allowed(self) -> bool {
        matches!(self, Self::Allowed)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::Outcome;

    /// The labels dashboards match on, spelled out once more on purpose.
    #[test]
    fn labels_are_the_published_ones() {
        let labels: Vec<&str> = Outcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(
            labels,
            [
                "allowed",
                "ip_not_allowed",
                "invalid_key",
                "report_only",
                "upstream_error",
                "bad_request"
            ]
        );
        assert_eq!(Outcome::ReportOnly.to_string(), "report_only");
        assert!(Outcome::Allowed.counts_as_allowed());
        assert!(!Outcome::ReportOnly.counts_as_allowed());
        assert!(!Outcome::IpNotAllowed.counts_as_allowed());
    }
}

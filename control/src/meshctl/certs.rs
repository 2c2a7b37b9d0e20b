//! `meshctl certs`: the workload certificates each agent holds, and when they expire.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use serde_json::Value;

use super::{
    table::{Table, short_duration},
    views::{AgentDump, CertificateView},
};

/// Printed for an agent that reports no certificates field at all.
pub const CA_NOT_ENABLED: &str = "no certificates yet: the CA is not enabled";

/// One agent's certificates.
#[derive(Debug, Clone, Serialize)]
pub struct AgentCerts {
    pub agent: String,
    pub error: Option<String>,
    /// `None` when the agent has no certificate support enabled.
    pub certificates: Option<Vec<CertRow>>,
}

/// A certificate with its expiry resolved.
#[derive(Debug, Clone, Serialize)]
pub struct CertRow {
    pub identity: String,
    /// Unix seconds, when `not_after` could be read.
    pub not_after: Option<u64>,
    /// Seconds until expiry (negative once expired).
    pub expires_in_seconds: Option<i64>,
}

/// Reads `not_after` as Unix seconds or an RFC 3339 timestamp.
pub fn not_after_seconds(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => humantime::parse_rfc3339_weak(s)
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
        _ => None,
    }
}

/// The certificates of one agent's dump, relative to `now` (Unix seconds).
pub fn from_dump(agent: &str, dump: &AgentDump, now: u64) -> AgentCerts {
    let rows = dump.certificates.as_ref().map(|certs| {
        certs
            .iter()
            .map(|c: &CertificateView| {
                let not_after = not_after_seconds(&c.not_after);
                CertRow {
                    identity: c.identity.clone(),
                    not_after,
                    expires_in_seconds: not_after.map(|t| t as i64 - now as i64),
                }
            })
            .collect()
    });
    AgentCerts { agent: agent.to_owned(), error: None, certificates: rows }
}

/// The human form: a line per agent without certificates, then a table of the rest.
pub fn render(agents: &[AgentCerts]) -> String {
    let mut out = String::new();
    let mut t = Table::new(["AGENT", "IDENTITY", "NOT AFTER", "EXPIRES"]);
    for a in agents {
        match (&a.error, &a.certificates) {
            (Some(e), _) => {
                let _ = writeln!(out, "{}: ! {e}", a.agent);
            }
            (None, None) => {
                let _ = writeln!(out, "{}: {CA_NOT_ENABLED}", a.agent);
            }
            (None, Some(rows)) if rows.is_empty() => {
                let _ = writeln!(out, "{}: no certificates (no workload identity issued yet)", a.agent);
            }
            (None, Some(rows)) => {
                for r in rows {
                    let not_after = r.not_after.map_or_else(
                        || "unreadable".into(),
                        |s| {
                            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string()
                        },
                    );
                    let expires = match r.expires_in_seconds {
                        Some(s) if s < 0 => format!("EXPIRED {} ago", short_duration(s.unsigned_abs())),
                        Some(s) => format!("in {}", short_duration(s as u64)),
                        None => "?".into(),
                    };
                    t.row(vec![a.agent.clone(), r.identity.clone(), not_after, expires]);
                }
            }
        }
    }
    if !t.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&t.render());
    }
    out
}

/// Unix seconds of `t` (0 before the epoch).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshctl::fixtures;

    #[test]
    fn agent_without_a_certificates_field_says_the_ca_is_off() {
        let certs = from_dump("http://a:15000", &fixtures::agent_dump(), 0);
        assert!(certs.certificates.is_none());
        assert_eq!(render(&[certs]), format!("http://a:15000: {CA_NOT_ENABLED}\n"));
    }

    #[test]
    fn certificates_show_expiry_from_seconds_or_rfc3339() {
        let mut dump = fixtures::agent_dump();
        dump.certificates = Some(vec![
            CertificateView {
                identity: "spiffe://td/ns/a/sa/x".into(),
                not_after: Value::from(1_700_003_600u64),
            },
            CertificateView {
                identity: "spiffe://td/ns/a/sa/y".into(),
                not_after: Value::from("2023-11-14T21:56:40Z"),
            },
        ]);
        let now = 1_700_000_000;
        let certs = from_dump("a", &dump, now);
        let rows = certs.certificates.as_ref().unwrap();
        assert_eq!(rows[0].expires_in_seconds, Some(3_600));
        assert_eq!(rows[1].not_after, Some(1_700_000_000 - 1_000));
        let text = render(&[certs]);
        let expected = "\
AGENT  IDENTITY               NOT AFTER             EXPIRES
a      spiffe://td/ns/a/sa/x  2023-11-14T23:13:20Z  in 1h
a      spiffe://td/ns/a/sa/y  2023-11-14T21:56:40Z  EXPIRED 16m40s ago
";
        assert_eq!(text, expected);
    }
}

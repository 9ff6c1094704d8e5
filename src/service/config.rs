//! The service's settings, read once at start-up.

use crate::auth::{self};
use crate::registry;
use crate::service::host::dovecot::Svc;
use crate::service::transport::tls::{self};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The service's configuration, from the `plugin {}` block.
#[derive(Clone)]
pub(crate) struct Config {
    pub(super) server_id: String,
    pub(super) peer: Option<String>,
    /// `tandem_peer_id`: the only server id a peer may announce, when set.
    pub(super) peer_id: Option<String>,
    pub(super) secret: Option<Arc<Vec<u8>>>,
    pub(super) state_dir: PathBuf,
    pub(super) base_dir: PathBuf,
    /// How often users are checked for resync marks and gaps.
    pub(super) scan_every: Duration,
    /// Certificates for the link's TLS; none needed (see [`tls`]).
    pub(super) tls_files: tls::TlsFiles,
    /// `tandem_max_rate`: bytes a second to the peer at most; 0, no cap.
    pub(crate) max_rate: u64,
    /// Why there is no usable secret, as logged: `tandem status` and `tandem check` show it
    /// too, or replication would be off with nothing but one log line to say so.
    pub(super) secret_problem: Option<String>,
}

pub(crate) fn config(svc: &Svc) -> Result<Config, String> {
    let server_id = svc
        .setting("tandem_server_id")
        .filter(|s| !s.is_empty())
        .ok_or("tandem_server_id is not set in plugin {}; the service does nothing")?;
    if !crate::settings::valid_server_id(&server_id) {
        return Err(format!(
            "tandem_server_id {server_id:?} is invalid: 1 to 64 characters of A-Z a-z 0-9 . _ -, \
             starting with a letter or digit; the service does nothing"
        ));
    }
    let peer_id = svc.setting("tandem_peer_id").filter(|s| !s.is_empty());
    if let Some(id) = &peer_id {
        if !crate::settings::valid_server_id(id) || *id == server_id {
            return Err(format!(
                "tandem_peer_id {id:?} is invalid: a server id other than this server's; \
                 the service does nothing"
            ));
        }
    }
    let state_dir = svc
        .setting("tandem_state_dir")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let dovecot = svc.state_dir();
            registry::default_state_dir(dovecot.to_str().filter(|d| !d.is_empty()))
        });
    let peer = svc.setting("tandem_peer").filter(|s| !s.is_empty());
    let mut secret_problem = None;
    let secret = match svc.setting("tandem_secret_file").filter(|s| !s.is_empty()) {
        None => {
            let e = "tandem_secret_file is not set: peer connections are refused and none is made";
            log::error!("{e}");
            secret_problem = Some(e.to_string());
            None
        }
        Some(path) => match auth::load_secret(std::path::Path::new(&path)) {
            Ok(s) => {
                if let Some(w) = s.warning() {
                    log::warn!("{w}");
                }
                Some(Arc::new(s.secret))
            }
            Err(e) => {
                let e = format!("{e}: peer connections are refused and none is made");
                log::error!("{e}");
                secret_problem = Some(e);
                None
            }
        },
    };
    let scan_every = match svc.setting("tandem_resync_scan_interval") {
        None => Duration::from_secs(30),
        Some(v) => humantime::parse_duration(v.trim())
            .ok()
            .or_else(|| v.trim().parse::<u64>().ok().map(Duration::from_secs))
            .filter(|d| !d.is_zero())
            .ok_or(format!(
                "tandem_resync_scan_interval {v:?} is not a duration (like 30s or 5min)"
            ))?,
    };
    let max_ahead = match svc.setting("tandem_clock_max_ahead") {
        None => crate::clock::DEFAULT_MAX_AHEAD,
        Some(v) => humantime::parse_duration(v.trim())
            .ok()
            .or_else(|| v.trim().parse::<u64>().ok().map(Duration::from_secs))
            .ok_or(format!(
                "tandem_clock_max_ahead {v:?} is not a duration (like 5min or 1h)"
            ))?,
    };
    crate::clock::set_max_ahead(max_ahead);
    let max_rate = match svc.setting("tandem_max_rate") {
        None => 0,
        Some(v) => parse_rate(&v).ok_or(format!(
            "tandem_max_rate {v:?} is not a rate in bytes a second (like 500k or 2M; 0: no cap)"
        ))?,
    };
    #[cfg(feature = "test-hooks")]
    if let Some(ms) = svc
        .setting("tandem_test_clock_offset")
        .and_then(|v| v.trim().parse().ok())
    {
        crate::clock::set_test_offset(ms);
    }
    #[cfg(feature = "test-hooks")]
    if let Some(ms) = svc
        .setting("tandem_test_read_pause")
        .and_then(|v| v.trim().parse().ok())
    {
        super::host::dovecot::set_test_read_pause(ms);
    }
    let file = |name: &str| {
        svc.setting(name)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    let tls_files = tls::TlsFiles {
        cert: file("tandem_tls_cert_file"),
        key: file("tandem_tls_key_file"),
        ca: file("tandem_tls_ca_file"),
    };
    Ok(Config {
        server_id,
        peer,
        peer_id,
        secret,
        state_dir,
        base_dir: svc.base_dir(),
        scan_every,
        tls_files,
        max_rate,
        secret_problem,
    })
}

/// Bytes a second: a number, with an optional k, M or G (binary multiples) and an optional B/s.
fn parse_rate(v: &str) -> Option<u64> {
    let v = v.trim();
    let v = v
        .strip_suffix("B/s")
        .or(v.strip_suffix("/s"))
        .unwrap_or(v)
        .trim_end();
    let (num, mult) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&v[..i], 1 << 20),
        (i, 'g' | 'G') => (&v[..i], 1 << 30),
        _ => (v, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_read_as_bytes_a_second() {
        assert_eq!(parse_rate("0"), Some(0));
        assert_eq!(parse_rate("8000"), Some(8000));
        assert_eq!(parse_rate("500k"), Some(500 << 10));
        assert_eq!(parse_rate(" 2M "), Some(2 << 20));
        assert_eq!(parse_rate("1G"), Some(1 << 30));
        assert_eq!(parse_rate("64kB/s"), Some(64 << 10));
        assert_eq!(parse_rate("fast"), None);
        assert_eq!(parse_rate("-1"), None);
        assert_eq!(parse_rate(""), None);
        assert_eq!(parse_rate("99999999999G"), None);
    }
}

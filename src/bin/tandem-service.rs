//! `tandem-service`: the process Dovecot's master starts from a `service tandem {}` block. It
//! streams this server's journals to the peer and applies the peer's (src/service/mod.rs).

#[cfg(target_os = "linux")]
#[path = "tandem-service/setid.rs"]
mod setid;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(tandem::service::process::main().clamp(0, 255) as u8)
}

//! The builds under test: the plugin, the service and the CLI, found from the environment or
//! under target/.

use std::fs;
use std::path::{Path, PathBuf};

/// A build made inside the Debian 13 chroot (`make trixie`): `$var`, else target/trixie/release/NAME.
pub(super) fn trixie_build(var: &str, name: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/trixie/release")
            .join(name)
    });
    assert!(
        p.is_file(),
        "no Dovecot 2.4 build at {}: run `make trixie` (it creates the Debian 13 chroot and \
         builds Tandem inside it)",
        p.display()
    );
    p
}

/// The tandem service executable: `$TANDEM_SERVICE`, else target/release/tandem-service.
pub fn service_bin() -> PathBuf {
    let p = std::env::var_os("TANDEM_SERVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/tandem-service")
        });
    assert!(
        p.is_file(),
        "no tandem service build at {}: run `make` (cargo build --release --features service --bin tandem-service)",
        p.display()
    );
    p
}

/// The service built with the `test-hooks` feature (`tandem_test_clock_offset`, the record of
/// fsyncs), from `TANDEM_SERVICE_TEST_HOOKS`, as `make test` builds it.
pub fn test_hooks_service_bin() -> PathBuf {
    let p = std::env::var_os("TANDEM_SERVICE_TEST_HOOKS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/tandem-service-test-hooks")
        });
    assert!(
        p.is_file(),
        "no test-hooks service build at {}: run `make test-hooks-service`",
        p.display()
    );
    p
}

/// The plugin .so: `$TANDEM_PLUGIN`, else the newest of target/{release,debug}/libtandem.so that
/// really is a plugin build. (A plain `cargo build` also writes a libtandem.so, without the
/// `plugin` feature and so without the entry points; Dovecot would refuse it.)
/// The plugin built with the `test-hooks` feature (`tandem_test_panic` works only there), from
/// `TANDEM_PLUGIN_TEST_HOOKS`, as `make test` builds it.
pub fn test_hooks_plugin_so() -> PathBuf {
    let p = std::env::var_os("TANDEM_PLUGIN_TEST_HOOKS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/libtandem-test-hooks.so")
        });
    assert!(
        p.is_file() && exports_plugin_init(&p),
        "no test-hooks plugin build at {}: run `make test`, or build it with \
         `cargo build --release --lib --features plugin,test-hooks` and copy \
         target/release/libtandem.so there",
        p.display()
    );
    p
}

pub fn plugin_so() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_PLUGIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "TANDEM_PLUGIN={} does not exist", p.display());
        assert!(
            exports_plugin_init(&p),
            "TANDEM_PLUGIN={} has no tandem_plugin_init: build it with \
             `cargo build --release --lib --features plugin`",
            p.display()
        );
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let candidates: Vec<PathBuf> = ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("libtandem.so"))
        .filter(|p| p.is_file())
        .collect();
    let newest = candidates
        .iter()
        .filter(|p| exports_plugin_init(p))
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
    match newest {
        Some(p) => p.clone(),
        None if candidates.is_empty() => panic!(
            "no plugin build found: run `cargo build --release --lib --features plugin` \
             (or `make`), or set TANDEM_PLUGIN=/path/to/libtandem.so"
        ),
        None => panic!(
            "{candidates:?} were built without the `plugin` feature (no tandem_plugin_init): run \
             `cargo build --release --lib --features plugin` (or `make`), or set TANDEM_PLUGIN"
        ),
    }
}

/// Whether the file's dynamic string table names `tandem_plugin_init` (a cheap symbol check).
fn exports_plugin_init(path: &Path) -> bool {
    let needle = b"\0tandem_plugin_init\0";
    fs::read(path)
        .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        .unwrap_or(false)
}

/// The CLI binary cargo built for this test run.
pub fn tandem_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

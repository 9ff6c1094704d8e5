//! Build script. Without features it does nothing, so the CLI and the tests build on machines
//! without Dovecot headers. With Dovecot's own flags from `dovecot-config`:
//! - feature `plugin`: compiles the mail-plugin shim (dovecot-glue/tandem-glue.c), runs bindgen
//!   on its header, and writes the plugin ABI version string;
//! - feature `service`: compiles the service's C side (dovecot-glue/tandem-service.c), runs
//!   bindgen on its header, and links libdovecot-storage and libdovecot (with an rpath to their
//!   directory), for the `tandem-service` executable;
//! - either: the shared log function (dovecot-glue/tandem-log.c) and its bindings.

use std::collections::HashMap;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};

const DEFAULT_DOVECOT_CONFIG: &str = "/usr/lib/dovecot/dovecot-config";
const GLUE_HEADER: &str = "dovecot-glue/tandem-glue.h";
const GLUE_SOURCE: &str = "dovecot-glue/tandem-glue.c";
const SERVICE_HEADER: &str = "dovecot-glue/tandem-service.h";
const SERVICE_SOURCE: &str = "dovecot-glue/tandem-service.c";
const SIEVE_SOURCE: &str = "dovecot-glue/tandem-sieve.c";
const LOG_HEADER: &str = "dovecot-glue/tandem-log.h";
const LOG_SOURCE: &str = "dovecot-glue/tandem-log.c";
const COMPAT_HEADER: &str = "dovecot-glue/tandem-compat.h";
const COMPAT_23: &str = "dovecot-glue/tandem-compat-2.3.c";
const COMPAT_24: &str = "dovecot-glue/tandem-compat-2.4.c";
const SETTINGS_HEADER: &str = "dovecot-glue/tandem-settings.h";
const SETTINGS_24: &str = "dovecot-glue/tandem-settings.c";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DOVECOT_CONFIG");
    let plugin = env::var_os("CARGO_FEATURE_PLUGIN").is_some();
    let service = env::var_os("CARGO_FEATURE_SERVICE").is_some();
    if !plugin && !service {
        return;
    }
    for file in [
        GLUE_HEADER,
        GLUE_SOURCE,
        SERVICE_HEADER,
        SERVICE_SOURCE,
        SIEVE_SOURCE,
        LOG_HEADER,
        LOG_SOURCE,
        COMPAT_HEADER,
        COMPAT_23,
        COMPAT_24,
        SETTINGS_HEADER,
        SETTINGS_24,
    ] {
        println!("cargo:rerun-if-changed={file}");
    }

    let config_path =
        env::var("DOVECOT_CONFIG").unwrap_or_else(|_| DEFAULT_DOVECOT_CONFIG.to_string());
    println!("cargo:rerun-if-changed={config_path}");
    let config = read_dovecot_config(Path::new(&config_path));
    let include_dir = config
        .get("dovecot_pkgincludedir")
        .cloned()
        .or_else(|| {
            config
                .get("LIBDOVECOT_INCLUDE")
                .and_then(|s| s.strip_prefix("-I").map(str::to_string))
        })
        .unwrap_or_else(|| {
            fail(&format!(
                "{config_path}: neither dovecot_pkgincludedir nor LIBDOVECOT_INCLUDE is set"
            ))
        });
    let config_h = Path::new(&include_dir).join("config.h");
    println!("cargo:rerun-if-changed={}", config_h.display());

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    // One tree for both Dovecots: what differs is in one C file per version (tandem-compat.h),
    // plus 2.4's declared settings; the Rust side sees the version as `cfg(dovecot_2_4)`.
    println!("cargo::rustc-check-cfg=cfg(dovecot_2_4)");
    let version = dovecot_version(&config_h);
    let (compat, extra): (&str, &[&str]) = match version {
        (2, 3) => (COMPAT_23, &[]),
        (2, 4) => (COMPAT_24, &[SETTINGS_24]),
        (major, minor) => fail(&format!(
            "Dovecot {major}.{minor} (from {}): Tandem builds for Dovecot 2.3 and 2.4",
            config_h.display()
        )),
    };
    if version == (2, 4) {
        println!("cargo:rustc-cfg=dovecot_2_4");
    }
    // Static libraries are linked in the order they are compiled: users before tandem_log.
    if plugin {
        write_abi_version(&config_h, &out_dir.join("abi_version.rs"));
        let sources: Vec<&str> = [GLUE_SOURCE, compat].iter().chain(extra).copied().collect();
        compile_c(&config, &include_dir, &sources, &[], "tandem_glue");
        generate_bindings(GLUE_HEADER, &out_dir.join("tandem_glue.rs"));
    }
    if service {
        // The compat file again, with its service part, as its own library: an object file
        // cannot be in two static libraries built with different defines.
        let sources: Vec<&str> = [SERVICE_SOURCE, SIEVE_SOURCE]
            .iter()
            .chain(extra)
            .copied()
            .collect();
        // Where Pigeonhole's doveadm plugin is looked for (see tandem-service.c, Sieve).
        let moduledir = format!(
            "TANDEM_MODULEDIR=\"{}\"",
            config
                .get("dovecot_moduledir")
                .map_or("/usr/lib/dovecot/modules", String::as_str)
        );
        compile_c(
            &config,
            &include_dir,
            &sources,
            &[&moduledir],
            "tandem_service",
        );
        // The stand-ins for doveadm's functions that Pigeonhole's doveadm plugin links against
        // must be in the executable's dynamic symbol table for that plugin to load.
        println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol=doveadm_*");
        compile_c(
            &config,
            &include_dir,
            &[compat],
            &["TANDEM_COMPAT_SERVICE"],
            "tandem_service_compat",
        );
        generate_bindings(SERVICE_HEADER, &out_dir.join("tandem_service.rs"));
    }
    compile_c(&config, &include_dir, &[LOG_SOURCE], &[], "tandem_log");
    generate_bindings(LOG_HEADER, &out_dir.join("tandem_log.rs"));
    if service {
        link_dovecot(&config, &config_path);
    }
}

/// Reads the shell-style `NAME=value`, `NAME="value"` and `NAME='value'` lines of
/// `dovecot-config`.
fn read_dovecot_config(path: &Path) -> HashMap<String, String> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| {
        fail(&format!(
            "cannot read {} ({e}): the Dovecot headers are missing. Install dovecot-dev \
             (`make deps` installs every package the build needs), or point DOVECOT_CONFIG at \
             dovecot-config",
            path.display()
        ))
    });
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once('=')?;
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return None;
            }
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            Some((name.to_string(), value.to_string()))
        })
        .collect()
}

/// The exported `tandem_plugin_version` is the whole `DOVECOT_ABI_VERSION`, as C plugins do with
/// the macro. Dovecot's loader (module-dir.c, versions_equal) compares character by character and
/// stops with "equal" only where *both* strings reach '(' or the end: "2.3.ABIv19(2.3.19.1)"
/// matches its "2.3.ABIv19(2.3.19.x)", but the bare prefix "2.3.ABIv19" is refused ("Module is
/// for different ABI version"), verified against Dovecot 2.3.19.1.
fn write_abi_version(config_h: &Path, out: &Path) {
    let text = fs::read_to_string(config_h)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", config_h.display())));
    let version = text
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("#define")?.trim_start();
            let rest = rest.strip_prefix("DOVECOT_ABI_VERSION")?.trim();
            rest.strip_prefix('"')?.strip_suffix('"')
        })
        .unwrap_or_else(|| fail(&format!("{}: no DOVECOT_ABI_VERSION", config_h.display())));
    // Checked so that it can go into a Rust c"..." literal as it is.
    assert!(
        !version.is_empty()
            && version.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'.' | b'-' | b'_' | b'(' | b')' | b'+' | b'~')
            }),
        "unexpected DOVECOT_ABI_VERSION {version:?}"
    );
    let code = format!(
        "/// `DOVECOT_ABI_VERSION`, from {}.\n\
         pub const ABI_VERSION: &::std::ffi::CStr = c\"{version}\";\n",
        config_h.display()
    );
    fs::write(out, code).unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", out.display())));
}

/// `DOVECOT_VERSION_MAJOR` and `_MINOR` from Dovecot's config.h.
fn dovecot_version(config_h: &Path) -> (u32, u32) {
    let text = fs::read_to_string(config_h)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", config_h.display())));
    let number = |name: &str| {
        text.lines()
            .find_map(|l| {
                let rest = l.trim().strip_prefix("#define")?.trim_start();
                rest.strip_prefix(name)?.trim().parse::<u32>().ok()
            })
            .unwrap_or_else(|| fail(&format!("{}: no {name}", config_h.display())))
    };
    (
        number("DOVECOT_VERSION_MAJOR"),
        number("DOVECOT_VERSION_MINOR"),
    )
}

fn compile_c(
    config: &HashMap<String, String>,
    include_dir: &str,
    sources: &[&str],
    defines: &[&str],
    lib: &str,
) {
    let mut build = cc::Build::new();
    build.files(sources);
    for define in defines {
        match define.split_once('=') {
            Some((name, value)) => build.define(name, Some(value)),
            None => build.define(define, None),
        };
    }
    build
        .include("dovecot-glue")
        .include(include_dir)
        .define("HAVE_CONFIG_H", None)
        .pic(true);
    // Dovecot's own warning and hardening flags. Optimisation, debug info and LTO are left to
    // cargo's profile: rustc's linker does not run GCC's LTO.
    for flag in config
        .get("DOVECOT_CFLAGS")
        .map(String::as_str)
        .unwrap_or("")
        .split_whitespace()
    {
        let skip = flag.starts_with("-O")
            || flag.starts_with("-g")
            || flag.starts_with("-flto")
            || flag == "-ffat-lto-objects"
            || flag.contains("_FORTIFY_SOURCE");
        if !skip {
            build.flag(flag);
        }
    }
    // DOVECOT_CFLAGS names the C standard Dovecot was built with (2.3: gnu99, 2.4: gnu11);
    // a custom dovecot-config without one gets the older, which both versions' headers accept.
    let cflags = config
        .get("DOVECOT_CFLAGS")
        .map(String::as_str)
        .unwrap_or("");
    if !cflags.split_whitespace().any(|f| f.starts_with("-std=")) {
        build.flag("-std=gnu99");
    }
    build.compile(lib);
}

/// The service is an executable, so unlike the plugin it must link Dovecot's libraries
/// (`LIBDOVECOT_STORAGE`, then `LIBDOVECOT`, as Dovecot's own services do). They live in a
/// private directory (/usr/lib/dovecot), found at run time through an rpath.
fn link_dovecot(config: &HashMap<String, String>, config_path: &str) {
    let mut dirs: Vec<String> = Vec::new();
    let mut libs: Vec<String> = Vec::new();
    for var in ["LIBDOVECOT_STORAGE", "LIBDOVECOT"] {
        let value = config
            .get(var)
            .unwrap_or_else(|| fail(&format!("{config_path}: {var} is not set")));
        for word in value.split_whitespace() {
            if let Some(dir) = word.strip_prefix("-L") {
                dirs.push(dir.to_string());
            } else if let Some(lib) = word.strip_prefix("-l") {
                libs.push(lib.to_string());
            }
        }
    }
    if dirs.is_empty() {
        // LIBDOVECOT normally carries -L; fall back to the package library directory.
        dirs.extend(config.get("dovecot_pkglibdir").cloned());
    }
    for dir in &dirs {
        println!("cargo:rustc-link-search=native={dir}");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    for lib in &libs {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}

/// Stops the build with one clear line instead of a panic and its backtrace hint: a missing
/// package is the builder's problem, not a bug in this script.
fn fail(message: &str) -> ! {
    println!("cargo::error={message}");
    std::process::exit(1);
}

fn generate_bindings(header: &str, out: &Path) {
    // bindgen loads libclang at run time and panics when it is not there; its message is turned
    // into one line that says which package to install.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let loaded = std::panic::catch_unwind(bindgen::clang_version);
    std::panic::set_hook(default_hook);
    if loaded.is_err() {
        fail(
            "bindgen cannot find libclang: install libclang-dev and clang \
             (`make deps` installs every package the build needs), or set LIBCLANG_PATH",
        );
    }
    let bindings = bindgen::Builder::default()
        .header(header)
        .clang_arg("-Idovecot-glue")
        // The crate's MSRV (Cargo.toml rust-version), so the output compiles wherever the crate does.
        .rust_target(bindgen::RustTarget::stable(80, 0).expect("a Rust target bindgen knows"))
        .allowlist_function("tandem_.*")
        .allowlist_type("tandem_.*")
        .allowlist_var("TANDEM_.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .layout_tests(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .unwrap_or_else(|e| fail(&format!("bindgen on {header} failed: {e}")));
    bindings
        .write_to_file(out)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", out.display())));
}

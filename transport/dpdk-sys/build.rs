//! Finds the system's libdpdk with pkg-config, generates bindings with bindgen using
//! pkg-config's own cflags (include paths, `-include rte_config.h`, `-march=...`), and
//! compiles bindgen's wrappers of DPDK's `static inline` fast-path functions (plus a tiny
//! shim) with the `cc` crate and the same flags. Links what pkg-config names.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL_HINT: &str = "on Debian 12: apt-get install libdpdk-dev dpdk libclang-dev pkg-config";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR")).join("src");
    println!("cargo:rerun-if-changed=src/wrapper.h");
    println!("cargo:rerun-if-changed=src/shim.c");
    println!("cargo:rerun-if-env-changed=DPDK_PMD_DIR");

    // Probe first without emitting link flags: the wrappers' static library must come
    // before the DPDK shared libraries on the link line (the linker runs --as-needed).
    let lib = pkg_config::Config::new()
        .atleast_version("22.11")
        .cargo_metadata(false)
        .probe("libdpdk")
        .unwrap_or_else(|e| panic!("dpdk-sys: libdpdk not found by pkg-config ({INSTALL_HINT}):\n{e}"));
    let cflags = pkg_config_cflags();

    let wrappers = out.join("dpdk_sys_static_fns");
    let bindings = bindgen::Builder::default()
        .header(src.join("wrapper.h").to_string_lossy())
        .clang_args(&cflags)
        .allowlist_function("rte_eal_.*")
        .allowlist_function("rte_eth_.*")
        .allowlist_function("rte_pktmbuf_.*")
        .allowlist_function("rte_mempool_.*")
        .allowlist_function("rte_mbuf.*")
        .allowlist_function("rte_ether_.*")
        .allowlist_function("rte_lcore_.*")
        .allowlist_function("rte_strerror|rte_socket_id|rte_version|rte_get_main_lcore|rte_get_tsc_hz|rte_rdtsc")
        .allowlist_function("dpdk_sys_.*")
        .allowlist_function("rte_dev_probe")
        .allowlist_var("RTE_MBUF_.*|RTE_PKTMBUF_.*|RTE_ETHER_.*|RTE_ETH_.*|RTE_MAX_.*|RTE_MEMPOOL_.*")
        .allowlist_var("SOCKET_ID_ANY|LCORE_ID_ANY|RTE_VER_.*")
        .allowlist_type("rte_mbuf|rte_mempool|rte_ether_hdr|rte_ether_addr|rte_eth_conf|rte_eth_dev_info|rte_eth_stats")
        .wrap_static_fns(true)
        .wrap_static_fns_path(&wrappers)
        .derive_default(true)
        .prepend_enum_name(false)
        // DPDK's doxygen comments would become (failing) doctests: leave them in the headers.
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .unwrap_or_else(|e| panic!("dpdk-sys: bindgen failed on the DPDK headers (needs libclang-dev): {e}"));
    bindings.write_to_file(out.join("bindings.rs")).expect("write bindings.rs");

    let mut build = cc::Build::new();
    build.file(wrappers.with_extension("c")).file(src.join("shim.c")).include(&src);
    for flag in &cflags {
        build.flag(flag);
    }
    for path in &lib.include_paths {
        build.include(path);
    }
    // bindgen's generated wrappers are not warning-clean with every DPDK header.
    build.warnings(false).compile("dpdk_sys_wrappers");

    // Now the DPDK libraries, after the wrappers.
    pkg_config::Config::new().atleast_version("22.11").probe("libdpdk").expect("libdpdk (second probe)");

    let pmd_dir = pmd_dir(&lib.link_paths);
    println!("cargo:rustc-env=DPDK_SYS_PMD_DIR={pmd_dir}");
    println!("cargo:pmd_dir={pmd_dir}");
    println!("cargo:rustc-env=DPDK_SYS_VERSION={}", lib.version);
}

/// pkg-config's cflags for libdpdk, verbatim (the `pkg-config` crate keeps only include
/// paths and defines, and drops `-include rte_config.h` and `-march=...`).
fn pkg_config_cflags() -> Vec<String> {
    let pkg_config = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".into());
    let output = Command::new(&pkg_config)
        .args(["--cflags", "libdpdk"])
        .output()
        .unwrap_or_else(|e| panic!("dpdk-sys: cannot run {pkg_config} ({INSTALL_HINT}): {e}"));
    assert!(
        output.status.success(),
        "dpdk-sys: {pkg_config} --cflags libdpdk failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("cflags are UTF-8").split_whitespace().map(str::to_owned).collect()
}

/// The directory EAL loads poll-mode drivers (PMDs) from: `$DPDK_PMD_DIR` if set, else
/// pkg-config's `pmdsdir` variable, else the `dpdk/pmds-*` directory under a library
/// directory (Debian: `/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0`).
fn pmd_dir(link_paths: &[PathBuf]) -> String {
    if let Ok(dir) = env::var("DPDK_PMD_DIR") {
        return dir;
    }
    if let Ok(dir) = pkg_config::get_variable("libdpdk", "pmdsdir") {
        if !dir.trim().is_empty() {
            return dir.trim().to_owned();
        }
    }
    let mut lib_dirs: Vec<PathBuf> = link_paths.to_vec();
    if let Ok(dir) = pkg_config::get_variable("libdpdk", "libdir") {
        lib_dirs.push(PathBuf::from(dir.trim()));
    }
    for dir in lib_dirs.iter().map(|d| d.join("dpdk")) {
        if let Some(found) = newest_pmds_subdir(&dir) {
            return found;
        }
    }
    panic!("dpdk-sys: no PMD directory (dpdk/pmds-*) under {lib_dirs:?}; set DPDK_PMD_DIR ({INSTALL_HINT})");
}

fn newest_pmds_subdir(dir: &Path) -> Option<String> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("pmds-")))
        .collect();
    found.sort();
    found.pop().map(|p| p.to_string_lossy().into_owned())
}

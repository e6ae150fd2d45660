//! Generates the agent's libibverbs and RDMA netlink bindings with bindgen from rdma-core's
//! headers. The headers come from, in order:
//! 1. `P2PRIG_RDMA_CORE`: an rdma-core artifact directory (with `include/`) or an include dir;
//! 2. the newest `p2prig build rdma-core` in the cache (`$P2PRIG_CACHE/rdma-core/latest`,
//!    `$P2PRIG_CACHE` defaulting to ~/.cache/p2prig), the build the guest ships;
//! 3. the system's (Debian's libibverbs-dev, installed by `make deps`), with a warning: the
//!    public verbs ABI is stable, so the agent still works with the guest's libibverbs.
//!
//! libibverbs itself is opened at run time (libloading), never linked.

use std::path::{Path, PathBuf};

const VERBS_HEADER: &str = "infiniband/verbs.h";

fn has_headers(include: &Path) -> bool {
    include.join(VERBS_HEADER).is_file() && include.join("rdma/rdma_netlink.h").is_file()
}

fn find_include() -> Result<(PathBuf, &'static str), String> {
    println!("cargo:rerun-if-env-changed=P2PRIG_RDMA_CORE");
    println!("cargo:rerun-if-env-changed=P2PRIG_CACHE");
    if let Some(dir) = std::env::var_os("P2PRIG_RDMA_CORE").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        for candidate in [dir.join("include"), dir.clone()] {
            if has_headers(&candidate) {
                return Ok((candidate, "P2PRIG_RDMA_CORE"));
            }
        }
        return Err(format!(
            "P2PRIG_RDMA_CORE={} holds neither include/{VERBS_HEADER} nor {VERBS_HEADER} \
             (with rdma/rdma_netlink.h); point it at the directory `p2prig build rdma-core` prints",
            dir.display()
        ));
    }
    let cache = std::env::var_os("P2PRIG_CACHE")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/p2prig")));
    if let Some(cache) = cache {
        let latest = cache.join("rdma-core/latest");
        // The link changes when a new rdma-core is built; its target's headers then differ.
        println!("cargo:rerun-if-changed={}", latest.display());
        let include = latest.join("include");
        if has_headers(&include) {
            return Ok((include, "the cache's rdma-core build"));
        }
    }
    let system = PathBuf::from("/usr/include");
    if has_headers(&system) {
        return Ok((system, "the system (libibverbs-dev)"));
    }
    Err(
        "no rdma-core headers found for the agent's verbs bindings: run \
         `cargo run --release -p p2prig -- build rdma-core` (or `make deps` for the system's \
         libibverbs-dev), or set P2PRIG_RDMA_CORE to an rdma-core build's directory"
            .to_string(),
    )
}

fn main() {
    let (include, origin) = match find_include() {
        Ok(found) => found,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(1);
        }
    };
    if origin.starts_with("the system") {
        println!(
            "cargo:warning=verbs bindings from {origin} headers in {}; \
             `p2prig build rdma-core` makes the agent use the guest's own rdma-core headers",
            include.display()
        );
    }
    for header in [VERBS_HEADER, "rdma/rdma_netlink.h"] {
        println!("cargo:rerun-if-changed={}", include.join(header).display());
    }
    let wrapper = "#include <infiniband/verbs.h>\n#include <rdma/rdma_netlink.h>\n";
    let functions = [
        "ibv_get_device_list",
        "ibv_free_device_list",
        "ibv_get_device_name",
        "ibv_open_device",
        "ibv_close_device",
        "ibv_alloc_pd",
        "ibv_dealloc_pd",
        "ibv_create_cq",
        "ibv_destroy_cq",
        "ibv_create_qp",
        "ibv_destroy_qp",
        "ibv_modify_qp",
        "ibv_query_qp",
        "_ibv_query_gid_table",
        "ibv_reg_mr",
        "ibv_reg_dmabuf_mr",
        "ibv_dereg_mr",
        "ibv_wc_status_str",
    ];
    let mut builder = bindgen::Builder::default()
        .header_contents("p2prig-verbs.h", wrapper)
        .clang_arg(format!("-I{}", include.display()))
        .dynamic_library_name("Verbs")
        .dynamic_link_require_all(true)
        .wrap_unsafe_ops(true)
        .prepend_enum_name(false)
        .derive_debug(true)
        .derive_default(true)
        .layout_tests(true)
        .allowlist_type("ibv_(wc|send_wr|recv_wr|sge|qp_attr|qp_init_attr|gid_entry|context_ops)")
        .allowlist_type("(ibv_wc_status|ibv_wc_opcode|ibv_wr_opcode|ibv_qp_state|ibv_mtu)")
        .allowlist_type("(ibv_access_flags|ibv_qp_attr_mask|ibv_send_flags|ibv_gid_type)")
        .allowlist_type("(ibv_qp_type|ibv_gid_type_sysfs)")
        .allowlist_item("RDMA_NL_NLDEV")
        .allowlist_type("rdma_nldev_command|rdma_nldev_attr");
    for function in functions {
        builder = builder.allowlist_function(function);
    }
    let bindings = match builder.generate() {
        Ok(bindings) => bindings,
        Err(error) => {
            eprintln!(
                "error: bindgen failed on {} ({origin}): {error}; bindgen needs libclang \
                 (package libclang-dev, installed by `make deps`)",
                include.display()
            );
            std::process::exit(1);
        }
    };
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("verbs.rs");
    if let Err(error) = bindings.write_to_file(&out) {
        eprintln!("error: writing {}: {error}", out.display());
        std::process::exit(1);
    }
    println!("cargo:rustc-env=P2PRIG_VERBS_HEADERS={}", include.display());
}

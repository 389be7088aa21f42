//! Builds the kernel programs (ebpf/programs, nightly + bpf-linker) and leaves
//! the objects in OUT_DIR, where `src/objects.rs` embeds them: the agent binary
//! is self-contained. `cargo xtask` installs the toolchain pieces first.
use std::{env, path::PathBuf};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("..");
    let programs = root.join("ebpf/programs");
    // The shared types change the programs too; aya-build watches only the
    // package it builds.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("ebpf/common").display()
    );

    if which("bpf-linker").is_none() {
        bail!(
            "bpf-linker is not on PATH; it links the eBPF programs. \
             Run `cargo xtask bootstrap` (or any xtask command) to install it."
        );
    }
    let programs_dir = programs
        .to_str()
        .context("ebpf/programs path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "sluice-ebpf",
            root_dir: programs_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("nightly"),
    )
}

fn which(program: &str) -> Option<PathBuf> {
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

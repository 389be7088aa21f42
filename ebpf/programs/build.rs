//! Code generation for BPF happens in bpf-linker. rustc already passes it
//! `--cpu generic` and aya-build owns RUSTFLAGS, so the one feature we need goes
//! in as `--cpu-features`: `alu32` (32-bit sub-registers, and with them 32-bit
//! atomics such as `xchg32`). 64-bit fetch-and-add is emitted as
//! `atomic_fetch_add` (BPF_FETCH) for the SeqCst intrinsics — checked in the
//! disassembly.
//!
//! Not `allows-misaligned-mem-access`: it also lets LLVM emit misaligned stack
//! loads, which the verifier rejects whatever the architecture.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg=--cpu-features=+alu32,+allows-misaligned-mem-access");
        println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
    }
}

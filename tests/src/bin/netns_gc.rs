//! Deletes what crashed test runs left behind: network namespaces named
//! `slt-<pid>-...` whose process is gone (and processes still inside them),
//! and their scratch directories and bpffs mounts. Live runs are untouched.

fn main() {
    let report = sluice_tests::cleanup_stale();
    for name in &report.namespaces {
        println!("deleted network namespace {name}");
    }
    for mount in &report.scratch.unmounted {
        println!("unmounted {}", mount.display());
    }
    for dir in &report.scratch.removed {
        println!("removed {}", dir.display());
    }
}

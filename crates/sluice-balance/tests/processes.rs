//! The same backends give the same table in another process: the test
//! re-runs its own binary as a child, which prints its table checksum.

mod common;

use std::process::Command;

use common::*;
use sluice_balance::{Algorithm, BuildOptions, Snapshot};

const CHILD_ENV: &str = "SLUICE_BALANCE_PRINT_CHECKSUM";
const PREFIX: &str = "SLUICE_TABLE_CHECKSUM=";

/// Checksums of a few tables: equal weights at the default size, mixed
/// weights, and a source_ip table with 1000 backends (M raised to 100003).
fn checksums() -> String {
    let mixed: Vec<u32> = (0..37).map(|i| 1 + (i * 7919) % 100).collect();
    let tables = [
        maglev(equal(100)).maglev_table(),
        maglev(members(&mixed)).maglev_table(),
        Snapshot::build(Algorithm::SourceIp, equal(1000), BuildOptions::default()).maglev_table(),
    ];
    tables
        .iter()
        .map(|t| format!("{}:{:016x}", t.len(), checksum(t)))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn same_table_in_two_processes() {
    if std::env::var_os(CHILD_ENV).is_some() {
        println!("{PREFIX}{}", checksums());
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args([
            "same_table_in_two_processes",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .expect("spawn the test binary");
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let child = stdout
        .lines()
        // libtest prints "test <name> ... " on the same line first.
        .find_map(|l| l.split_once(PREFIX).map(|(_, rest)| rest.trim()))
        .unwrap_or_else(|| panic!("no checksum line in child output:\n{stdout}"));
    let parent = checksums();
    eprintln!("parent {parent}\nchild  {child}");
    assert_eq!(child, parent);
}

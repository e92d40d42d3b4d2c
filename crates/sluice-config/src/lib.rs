//! sluice configuration: YAML text in, a validated [`Config`] out, and a
//! [`diff`] between two configs for live reload.
//!
//! This crate owns parsing (serde-saphyr, with budget and alias limits),
//! validation (two stages: raw serde structs with `deny_unknown_fields`, then
//! the typed model in [`model`]) and the reload diff. It must never bind a
//! socket, start a thread or touch the clock: `sluice check` relies on that.
//! Host names in addresses are resolved while loading (a blocking lookup),
//! which is the one piece of the outside world it reads.
//!
//! The rule: nothing outside this crate sees raw YAML. A [`Config`] is valid
//! by construction; every problem is a [`Diagnostic`] naming the file, line,
//! column, key path and what was expected, and all the value problems of a
//! file are reported at once.
//!
//! ```
//! let yaml = "
//! services:
//!   - name: web
//!     protocol: tcp
//!     listen: [\"127.0.0.1:8080\"]
//!     backends:
//!       - address: 127.0.0.1:9000
//!         weight: 0
//! ";
//! let err = sluice_config::load_str(yaml, "web.yaml").unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "web.yaml:8:17: services[0].backends[0].weight: must be between 1 and 10000, got 0"
//! );
//!
//! let fixed = yaml.replace("weight: 0", "weight: 5");
//! let old = sluice_config::load_str(yaml.replace("weight: 0", "weight: 1").as_str(), "a").unwrap();
//! let new = sluice_config::load_str(&fixed, "b").unwrap();
//! let d = sluice_config::diff(&old, &new);
//! assert_eq!(d.to_string(), "service web: backend 127.0.0.1:9000 weight 1 -> 5");
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod addr;
mod diff;
mod error;
mod load;
pub mod model;
mod pathindex;
mod raw;
mod summary;
mod validate;

pub use diff::{diff, ConfigDiff, LimitChange, ServiceDiff, SettingChange, WeightChange};
pub use error::{Diagnostic, LoadError, LoadErrorKind};
pub use load::{load_file, load_str, MAX_FILE_SIZE};
pub use model::*;
pub use summary::summary;

/// The candidate closest to `word` by edit distance, if it is close enough
/// to be a likely typo.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    #[test]
    fn closest_finds_typos() {
        assert_eq!(
            super::closest("balence", &["balance", "backends"]),
            Some("balance")
        );
        assert_eq!(super::closest("xyz", &["balance", "backends"]), None);
    }
}

//! Reading a file: the checks before parsing (size, binary, UTF-8, empty),
//! the YAML parse with its limits, and the turn of parser errors into
//! [`Diagnostic`]s with key paths.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde_saphyr::budget::BudgetBreach;
use serde_saphyr::options::DuplicateKeyPolicy;
use serde_saphyr::{Error as YamlError, MessageFormatter, Spanned, UserMessageFormatter};

use crate::error::{one_line, Diagnostic, LoadError, LoadErrorKind};
use crate::model::Config;
use crate::pathindex::{PathIndex, Role};
use crate::raw::RawConfig;
use crate::validate::{validate, Diags};

/// The largest configuration file accepted, in bytes (1 MiB).
pub const MAX_FILE_SIZE: u64 = 1024 * 1024;

/// Most diagnostics reported for one file; the rest are counted.
const MAX_DIAGNOSTICS: usize = 100;

/// Parser limits. A real configuration is far below every one of them.
const MAX_EVENTS: usize = 100_000;
const MAX_NODES: usize = 50_000;
const MAX_DEPTH: usize = 32;
const MAX_ALIASES: usize = 1_000;
const MAX_ANCHORS: usize = 1_000;
const MAX_REPLAYED_EVENTS: usize = 10_000;
const MAX_EXPANSIONS_PER_ANCHOR: usize = 100;

/// Loads and validates the configuration file at `path`.
///
/// Never reads more than [`MAX_FILE_SIZE`] + 1 bytes, and refuses anything
/// that is not a regular file (a directory, a FIFO, a device) before opening
/// it, so a wrong path cannot hang the caller.
pub fn load_file(path: &Path) -> Result<Config, LoadError> {
    let file_name = path.display().to_string();
    let read_err = |kind, msg: String| LoadError::whole_file(kind, &file_name, msg);

    let meta = std::fs::metadata(path)
        .map_err(|e| read_err(LoadErrorKind::Read, format!("cannot read: {e}")))?;
    if meta.is_dir() {
        return Err(read_err(
            LoadErrorKind::Read,
            "cannot read: is a directory, not a configuration file".to_owned(),
        ));
    }
    if !meta.is_file() {
        return Err(read_err(
            LoadErrorKind::Read,
            "cannot read: not a regular file (a device, FIFO or socket)".to_owned(),
        ));
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(too_large(&file_name, meta.len()));
    }
    let file =
        File::open(path).map_err(|e| read_err(LoadErrorKind::Read, format!("cannot read: {e}")))?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0) + 1);
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| read_err(LoadErrorKind::Read, format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        // The file grew between stat and read.
        return Err(too_large(&file_name, bytes.len() as u64));
    }
    let text = decode(&bytes, &file_name)?;
    load_str(text, &file_name)
}

/// Parses and validates configuration text. `file_name` is only used in
/// diagnostics.
pub fn load_str(text: &str, file_name: &str) -> Result<Config, LoadError> {
    if text.len() as u64 > MAX_FILE_SIZE {
        return Err(too_large(file_name, text.len() as u64));
    }
    if text.contains('\0') {
        return Err(binary(file_name));
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(LoadError::whole_file(
            LoadErrorKind::Empty,
            file_name,
            "empty configuration: the file has no settings (only blanks or comments); it needs at least `services:`"
                .to_owned(),
        ));
    }

    let (index, syntax) = PathIndex::build(text, MAX_EVENTS);
    if let Some(e) = syntax {
        return Err(LoadError::new(
            LoadErrorKind::Syntax,
            vec![Diagnostic {
                file: file_name.to_owned(),
                line: Some(e.line),
                column: Some(e.column),
                path: e.path,
                message: one_line(&e.message),
            }],
        ));
    }

    let raw: Spanned<RawConfig> =
        serde_saphyr::from_str_with_options(text, options()).map_err(|e| {
            LoadError::new(
                LoadErrorKind::Syntax,
                vec![yaml_diagnostic(&e, &index, file_name)],
            )
        })?;

    let mut diags = Diags::new(file_name);
    match validate(&raw, &index, &mut diags) {
        Some(config) if diags.list.is_empty() => Ok(config),
        _ => {
            let mut list = diags.list;
            list.sort_by_key(|d| (d.line, d.column));
            if list.len() > MAX_DIAGNOSTICS {
                let more = list.len() - MAX_DIAGNOSTICS;
                list.truncate(MAX_DIAGNOSTICS);
                list.push(Diagnostic {
                    file: file_name.to_owned(),
                    line: None,
                    column: None,
                    path: String::new(),
                    message: format!("... and {more} more errors"),
                });
            }
            Err(LoadError::new(LoadErrorKind::Invalid, list))
        }
    }
}

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_reader_input_bytes: Some(4 * 1024 * 1024),
            max_events: MAX_EVENTS,
            max_nodes: MAX_NODES,
            max_depth: MAX_DEPTH,
            max_documents: 1,
            max_aliases: MAX_ALIASES,
            max_anchors: MAX_ANCHORS,
            max_total_scalar_bytes: 2 * 1024 * 1024,
            max_merge_keys: 1_000,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_REPLAYED_EVENTS,
            max_replay_stack_depth: 16,
            max_alias_expansions_per_anchor: MAX_EXPANSIONS_PER_ANCHOR,
        },
        duplicate_keys: DuplicateKeyPolicy::Error,
        strict_booleans: true,
        with_snippet: false,
    }
}

fn too_large(file: &str, size: u64) -> LoadError {
    LoadError::whole_file(
        LoadErrorKind::TooLarge,
        file,
        format!(
            "file too large: {size} bytes, a configuration may be at most {MAX_FILE_SIZE} bytes (1 MiB)"
        ),
    )
}

fn binary(file: &str) -> LoadError {
    LoadError::whole_file(
        LoadErrorKind::NotText,
        file,
        "not a text file: it contains NUL bytes (binary data), expected YAML".to_owned(),
    )
}

/// The bytes as UTF-8 text, or an error naming the first bad byte.
fn decode<'a>(bytes: &'a [u8], file: &str) -> Result<&'a str, LoadError> {
    if bytes.contains(&0) {
        return Err(binary(file));
    }
    std::str::from_utf8(bytes).map_err(|e| {
        let good = &bytes[..e.valid_up_to()];
        let line = good.iter().filter(|b| **b == b'\n').count() + 1;
        let line_start = good.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        let column = String::from_utf8_lossy(&good[line_start..]).chars().count() + 1;
        let byte = bytes.get(e.valid_up_to()).copied().unwrap_or(0);
        LoadError::new(
            LoadErrorKind::NotText,
            vec![Diagnostic {
                file: file.to_owned(),
                line: Some(line),
                column: Some(column),
                path: String::new(),
                message: format!(
                    "not UTF-8 text: invalid byte 0x{byte:02x}; save the file as UTF-8"
                ),
            }],
        )
    })
}

/// Turns a serde-saphyr error into a diagnostic: its position, the key path
/// found through the index, and a message in this crate's words.
fn yaml_diagnostic(err: &YamlError, index: &PathIndex, file: &str) -> Diagnostic {
    let mut inner = err.without_snippet();
    let mut location = err.location();
    // An error inside an alias: report it where the alias is used.
    while let YamlError::AliasError {
        error, locations, ..
    } = inner
    {
        location = locations.primary_location().or(location);
        inner = error.without_snippet();
    }
    let (line, column) = match location {
        Some(l) if l.line() > 0 => (
            usize::try_from(l.line()).ok(),
            usize::try_from(l.column()).ok(),
        ),
        _ => (None, None),
    };
    let (l, c) = (line.unwrap_or(0), column.unwrap_or(0));
    let value = index.at(l, c, Role::Value);
    let key = index.at(l, c, Role::Key);
    let got = value
        .map(|e| format!(", got {}", e.kind.describe()))
        .unwrap_or_default();
    let fallback_path = || {
        value
            .or(key)
            .or_else(|| index.before(l, c))
            .map(|e| e.path.clone())
            .unwrap_or_default()
    };

    let (path, message) = match inner {
        YamlError::SerdeUnknownField {
            field, expected, ..
        } => {
            let path = key.map_or_else(fallback_path, |e| e.path.clone());
            let expected: Vec<&str> = if path.starts_with("defaults.") {
                expected
                    .iter()
                    .copied()
                    .filter(|k| !matches!(*k, "name" | "listen" | "backends"))
                    .collect()
            } else {
                expected.clone()
            };
            let hint = crate::closest(field, &expected)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            (
                path,
                format!(
                    "unknown key `{field}`{hint}; expected one of: {}",
                    expected.join(", ")
                ),
            )
        }
        YamlError::DuplicateMappingKey { key: k, .. } => {
            let first = key
                .and_then(|e| index.first_key(e))
                .filter(|f| (f.line, f.column) != (l, c))
                .map(|f| format!(" (first given at line {})", f.line))
                .unwrap_or_default();
            let name = k.clone().or_else(|| key.and_then(|e| e.key.clone()));
            let msg = match name {
                Some(n) => format!("key `{n}` given twice in the same mapping{first}"),
                None => format!("key given twice in the same mapping{first}"),
            };
            (key.map_or_else(fallback_path, |e| e.path.clone()), msg)
        }
        YamlError::Unexpected { expected, .. } if value.is_some_and(|v| v.path.is_empty()) => (
            String::new(),
            format!(
                "expected {}{got}",
                "a mapping of top-level keys (workers, admin, shutdown_timeout, defaults, services)"
            ),
        ),
        YamlError::Unexpected { expected, .. } => {
            let want = match *expected {
                "mapping start" => "a mapping (indented `key: value` lines)",
                "sequence start" => "a list (`- item` lines or [a, b])",
                other => other,
            };
            (fallback_path(), format!("expected {want}{got}"))
        }
        YamlError::SerdeInvalidType { expected, .. } => {
            (fallback_path(), format!("expected {expected}{got}"))
        }
        YamlError::SerdeMissingField { field, .. } => {
            (fallback_path(), format!("missing required key `{field}`"))
        }
        YamlError::Budget {
            breach: BudgetBreach::Documents { .. },
            ..
        } => (String::new(), budget_message(&BudgetBreach::Documents { documents: 2 })),
        YamlError::Budget { breach, .. } => (fallback_path(), budget_message(breach)),
        YamlError::AliasReplayLimitExceeded { .. }
        | YamlError::AliasExpansionLimitExceeded { .. }
        | YamlError::AliasReplayStackDepthExceeded { .. }
        | YamlError::AliasReplayCounterOverflow { .. } => (
            fallback_path(),
            format!(
                "YAML aliases expand to too much: more than {MAX_REPLAYED_EVENTS} nodes in all, or one anchor used more than {MAX_EXPANSIONS_PER_ANCHOR} times (an alias bomb?)"
            ),
        ),
        YamlError::MultipleDocuments { .. } => (
            String::new(),
            "more than one YAML document (`---`): a configuration is a single document".to_owned(),
        ),
        YamlError::Eof { .. } => (fallback_path(), "unexpected end of the file".to_owned()),
        other => (
            fallback_path(),
            UserMessageFormatter.format_message(other).into_owned(),
        ),
    };
    Diagnostic {
        file: file.to_owned(),
        line,
        column,
        path,
        message: one_line(&message),
    }
}

fn budget_message(breach: &BudgetBreach) -> String {
    match breach {
        BudgetBreach::Depth { .. } => {
            format!("nested too deeply: a configuration is at most {MAX_DEPTH} levels deep")
        }
        BudgetBreach::Documents { .. } => {
            "more than one YAML document (`---`): a configuration is a single document".to_owned()
        }
        BudgetBreach::Aliases { .. }
        | BudgetBreach::Anchors { .. }
        | BudgetBreach::AliasAnchorRatio { .. } => format!(
            "too many YAML anchors or aliases (at most {MAX_ALIASES}); is this an alias bomb?"
        ),
        BudgetBreach::Nodes { .. } | BudgetBreach::Events { .. } => {
            format!("too many YAML nodes (at most {MAX_NODES}); this is not a sluice configuration")
        }
        other => format!("YAML resource limit exceeded: {other:?}"),
    }
}

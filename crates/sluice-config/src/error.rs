//! [`LoadError`] and its [`Diagnostic`]s: what `sluice check` prints.

use std::fmt;

/// One problem found in a configuration file.
///
/// Printed as `FILE:LINE:COL: PATH: MESSAGE`, or `FILE: MESSAGE` when the
/// problem has no position (a missing or unreadable file, a directory, ...).
/// `line` and `column` are 1-based; the column counts characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file name as given to the loader.
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The key path, like `services[1].backends[0].address`; empty for a
    /// problem with the file as a whole.
    pub path: String,
    /// What is wrong and what was expected; a single line.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        match (self.line, self.column) {
            (Some(line), Some(col)) => write!(f, ":{line}:{col}")?,
            (Some(line), None) => write!(f, ":{line}")?,
            _ => {}
        }
        f.write_str(": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// What kind of failure a [`LoadError`] is, for callers that want to match
/// on it (exit codes, metrics labels). Every kind is an invalid
/// configuration to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoadErrorKind {
    /// The file could not be read: missing, unreadable, a directory, not a
    /// regular file.
    Read,
    /// The file is larger than [`crate::MAX_FILE_SIZE`].
    TooLarge,
    /// Binary data or text that is not UTF-8.
    NotText,
    /// Empty, or only blanks and comments.
    Empty,
    /// Not well-formed YAML, or YAML of the wrong shape (unknown key, key
    /// given twice, a list where a mapping belongs, a resource limit hit).
    Syntax,
    /// Well-formed, but values break the rules (bad address, duplicate
    /// service name, weight out of range, ...). All such problems of the
    /// file are reported at once.
    Invalid,
}

impl LoadErrorKind {
    /// A short lowercase label (`read`, `too_large`, `not_text`, `empty`,
    /// `syntax`, `invalid`).
    pub fn as_str(self) -> &'static str {
        match self {
            LoadErrorKind::Read => "read",
            LoadErrorKind::TooLarge => "too_large",
            LoadErrorKind::NotText => "not_text",
            LoadErrorKind::Empty => "empty",
            LoadErrorKind::Syntax => "syntax",
            LoadErrorKind::Invalid => "invalid",
        }
    }
}

/// A configuration that could not be loaded: one or more [`Diagnostic`]s.
///
/// `Display` prints every diagnostic, one per line (no trailing newline).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", Lines(&self.diagnostics))]
pub struct LoadError {
    kind: LoadErrorKind,
    diagnostics: Vec<Diagnostic>,
}

impl LoadError {
    pub(crate) fn new(kind: LoadErrorKind, diagnostics: Vec<Diagnostic>) -> LoadError {
        LoadError { kind, diagnostics }
    }

    /// A problem with the file as a whole, without a position.
    pub(crate) fn whole_file(kind: LoadErrorKind, file: &str, message: String) -> LoadError {
        LoadError::new(
            kind,
            vec![Diagnostic {
                file: file.to_owned(),
                line: None,
                column: None,
                path: String::new(),
                message,
            }],
        )
    }

    /// Every problem found, in file order. Never empty.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }

    pub fn kind(&self) -> LoadErrorKind {
        self.kind
    }
}

struct Lines<'a>(&'a [Diagnostic]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Makes a message safe to print on one line: control characters (a YAML
/// value may hold a newline) are escaped.
pub(crate) fn one_line(message: &str) -> String {
    if !message.chars().any(char::is_control) {
        return message.to_owned();
    }
    message
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

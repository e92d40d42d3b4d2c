//! A map from source positions to key paths (`services[1].backends[0]`),
//! built from the YAML event stream before deserialising.
//!
//! serde-saphyr reports a line and column for syntax and type errors but not
//! the key path; this index turns the position back into a path. The same
//! pass finds syntax errors, with the path of the collection they are in.

use serde_saphyr::granit_parser::{Event, Parser};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A mapping key; its path ends in that key.
    Key,
    /// A value: the root, a mapping value or a sequence item.
    Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeKind {
    Scalar,
    List,
    Mapping,
    Alias,
}

impl NodeKind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            NodeKind::Scalar => "a single value",
            NodeKind::List => "a list",
            NodeKind::Mapping => "a mapping",
            NodeKind::Alias => "an alias",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub line: usize,
    pub column: usize,
    pub role: Role,
    pub kind: NodeKind,
    pub path: String,
    /// For a scalar key: the key text.
    pub key: Option<String>,
}

/// A syntax error found while building the index.
#[derive(Debug, Clone)]
pub(crate) struct SyntaxError {
    pub line: usize,
    pub column: usize,
    /// The collection the error is in.
    pub path: String,
    pub message: String,
}

#[derive(Debug, Default)]
pub(crate) struct PathIndex {
    entries: Vec<Entry>,
}

enum Frame {
    Seq {
        path: String,
        next: usize,
    },
    Map {
        path: String,
        want_key: bool,
        key: String,
    },
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

impl PathIndex {
    /// Walks the events of `src`. Returns the index and the first syntax
    /// error, if any; more than `max_events` events is an error too (so a
    /// huge document costs one bounded pass).
    pub(crate) fn build(src: &str, max_events: usize) -> (PathIndex, Option<SyntaxError>) {
        let mut index = PathIndex::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut documents = 0usize;
        for (n, item) in Parser::new_from_str(src).enumerate() {
            let (event, span) = match item {
                Ok(ev) => ev,
                Err(e) => {
                    let path = match stack.last() {
                        Some(Frame::Seq { path, .. }) | Some(Frame::Map { path, .. }) => {
                            path.clone()
                        }
                        None => String::new(),
                    };
                    let err = SyntaxError {
                        line: e.marker().line().max(1),
                        column: e.marker().col() + 1,
                        path,
                        message: format!("YAML syntax error: {}", e.info()),
                    };
                    return (index, Some(err));
                }
            };
            let line = span.start.line();
            let column = span.start.col() + 1;
            if n >= max_events {
                let err = SyntaxError {
                    line,
                    column,
                    path: String::new(),
                    message: format!(
                        "too many YAML nodes (more than {max_events}); this is not a sluice configuration"
                    ),
                };
                return (index, Some(err));
            }
            let kind = match &event {
                Event::Scalar(..) => NodeKind::Scalar,
                Event::SequenceStart(..) => NodeKind::List,
                Event::MappingStart(..) => NodeKind::Mapping,
                Event::Alias(..) => NodeKind::Alias,
                Event::SequenceEnd | Event::MappingEnd => {
                    stack.pop();
                    continue;
                }
                Event::DocumentStart(..) => {
                    documents += 1;
                    // Only the first document is indexed; the deserialiser
                    // rejects a second one.
                    if documents > 1 {
                        break;
                    }
                    continue;
                }
                _ => continue,
            };
            let (role, path, key) = match stack.last_mut() {
                None => (Role::Value, String::new(), None),
                Some(Frame::Seq { path, next }) => {
                    let p = format!("{path}[{next}]");
                    *next += 1;
                    (Role::Value, p, None)
                }
                Some(Frame::Map {
                    path,
                    want_key,
                    key,
                }) => {
                    if *want_key {
                        *want_key = false;
                        let text = match &event {
                            Event::Scalar(text, ..) => text.to_string(),
                            _ => "?".to_owned(),
                        };
                        *key = text.clone();
                        (Role::Key, join(path, &text), Some(text))
                    } else {
                        *want_key = true;
                        (Role::Value, join(path, key), None)
                    }
                }
            };
            match kind {
                NodeKind::List => stack.push(Frame::Seq {
                    path: path.clone(),
                    next: 0,
                }),
                NodeKind::Mapping => stack.push(Frame::Map {
                    path: path.clone(),
                    want_key: true,
                    key: String::new(),
                }),
                NodeKind::Scalar | NodeKind::Alias => {}
            }
            index.entries.push(Entry {
                line,
                column,
                role,
                kind,
                path,
                key,
            });
        }
        (index, None)
    }

    /// The entry of `role` that starts exactly at `line:column` (the
    /// innermost one when a mapping and its first key share a position).
    pub(crate) fn at(&self, line: usize, column: usize, role: Role) -> Option<&Entry> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.line == line && e.column == column && e.role == role)
    }

    /// Where the key with this full path is written, if it is.
    pub(crate) fn key(&self, path: &str) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .find(|e| e.role == Role::Key && e.path == path)
            .map(|e| (e.line, e.column))
    }

    /// The last entry that starts at or before `line:column`.
    pub(crate) fn before(&self, line: usize, column: usize) -> Option<&Entry> {
        self.entries
            .iter()
            .rev()
            .find(|e| (e.line, e.column) <= (line, column))
    }

    /// The first occurrence of the key `dup` in its mapping (to say where a
    /// key given twice was first given).
    pub(crate) fn first_key(&self, dup: &Entry) -> Option<&Entry> {
        let key = dup.key.as_deref()?;
        self.entries
            .iter()
            .find(|e| e.role == Role::Key && e.path == dup.path && e.key.as_deref() == Some(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_nested_nodes() {
        let src = "services:\n  - name: a\n    listen: [x, 'y']\n    h: {k: v}\n";
        let (idx, err) = PathIndex::build(src, 1000);
        assert!(err.is_none());
        let e = idx.at(3, 17, Role::Value).map(|e| e.path.as_str());
        assert_eq!(e, Some("services[0].listen[1]"));
        let e = idx.at(4, 5, Role::Key).map(|e| e.path.as_str());
        assert_eq!(e, Some("services[0].h"));
        let e = idx.at(2, 5, Role::Value).map(|e| e.path.as_str());
        assert_eq!(e, Some("services[0]"));
        let e = idx.at(4, 9, Role::Key).map(|e| e.path.as_str());
        assert_eq!(e, Some("services[0].h.k"));
    }

    #[test]
    fn syntax_error_has_position_and_path() {
        let src = "services:\n  - name: a\n    listen: [x\n";
        let (_, err) = PathIndex::build(src, 1000);
        let err = err.expect("syntax error");
        assert_eq!(err.path, "services[0].listen");
        assert!(err.line >= 3);
    }
}

//! A tiny `--key value` parser (the tools take a handful of options).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Default)]
pub(crate) struct Args {
    values: HashMap<String, Vec<String>>,
}

impl Args {
    pub(crate) fn parse(argv: &[String]) -> Result<Self, String> {
        let mut args = Args::default();
        let mut it = argv.iter();
        while let Some(key) = it.next() {
            let Some(name) = key.strip_prefix("--") else {
                return Err(format!("expected an option like --target, got `{key}`"));
            };
            let Some(value) = it.next() else {
                return Err(format!("option --{name} needs a value"));
            };
            args.values
                .entry(name.to_string())
                .or_default()
                .push(value.clone());
        }
        Ok(args)
    }

    pub(crate) fn str(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    pub(crate) fn all(&self, key: &str) -> Vec<&str> {
        self.values
            .get(key)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    pub(crate) fn addr(&self, key: &str) -> Result<SocketAddr, String> {
        let v = self
            .str(key)
            .ok_or_else(|| format!("--{key} is required"))?;
        parse_addr(v)
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize, String> {
        match self.str(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{key}: expected a whole number, got `{v}`")),
        }
    }

    pub(crate) fn duration_or(&self, key: &str, default: Duration) -> Result<Duration, String> {
        match self.str(key) {
            None => Ok(default),
            Some(v) => parse_duration(v).ok_or_else(|| {
                format!("--{key}: expected a duration like 500ms or 10s, got `{v}`")
            }),
        }
    }
}

pub(crate) fn parse_addr(v: &str) -> Result<SocketAddr, String> {
    v.parse()
        .map_err(|_| format!("expected IP:PORT, got `{v}`"))
}

/// `250ms`, `10s`, `1.5s`.
fn parse_duration(v: &str) -> Option<Duration> {
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    let x: f64 = num.parse().ok()?;
    (x.is_finite() && x >= 0.0).then(|| Duration::from_secs_f64(x * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("3"), None);
        assert_eq!(parse_duration("-1s"), None);
    }

    #[test]
    fn options() {
        let argv: Vec<String> = [
            "--listen",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:2",
            "--n",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let a = Args::parse(&argv).unwrap();
        assert_eq!(a.all("listen").len(), 2);
        assert_eq!(a.usize_or("n", 0).unwrap(), 3);
        assert_eq!(a.usize_or("m", 7).unwrap(), 7);
        assert!(Args::parse(&argv[..1]).is_err());
    }
}

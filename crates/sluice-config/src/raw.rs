//! Stage one: the file as serde sees it. Every struct denies unknown keys;
//! every leaf is a [`Scalar`] wrapped in [`Spanned`] so that stage two
//! (`validate`) can report a position for any value it rejects, and so that
//! a wrongly typed scalar (`weight: "heavy"`) is a validation error that is
//! collected with all the others instead of stopping the parse.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

pub(crate) type Sp<T> = Spanned<T>;
pub(crate) type Field = Option<Sp<Scalar>>;

/// Any YAML scalar, as typed by the YAML core schema (with strict booleans:
/// only `true` and `false` are booleans, so `no` stays a string).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scalar {
    Str(String),
    Int(i128),
    Float(f64),
    Bool(bool),
    Null,
}

impl Scalar {
    /// How to show the value in a message: strings quoted, the rest bare.
    pub(crate) fn describe(&self) -> String {
        match self {
            Scalar::Str(s) => format!("{s:?}"),
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(x) => x.to_string(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Null => "nothing (null)".to_owned(),
        }
    }

    /// The value as text, for fields that take a word or a name (a number
    /// like `name: 1` is text too).
    pub(crate) fn text(&self) -> Option<String> {
        match self {
            Scalar::Str(s) => Some(s.clone()),
            Scalar::Int(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;

        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a single value (text, a number, or true/false)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Scalar, E> {
                Ok(i128::try_from(v).map_or(Scalar::Float(v as f64), Scalar::Int))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
        }

        deserializer.deserialize_any(ScalarVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of top-level keys (workers, admin, shutdown_timeout, defaults, services)"
)]
pub(crate) struct RawConfig {
    pub workers: Field,
    pub admin: Option<Sp<RawAdmin>>,
    pub shutdown_timeout: Field,
    pub defaults: Option<Sp<RawDefaults>>,
    pub services: Option<Sp<Vec<Sp<RawService>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping like `listen: 127.0.0.1:9100`"
)]
pub(crate) struct RawAdmin {
    pub listen: Field,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of service settings")]
pub(crate) struct RawService {
    pub name: Field,
    pub protocol: Field,
    pub listen: Option<Sp<Vec<Sp<Scalar>>>>,
    pub balance: Field,
    pub transfer: Field,
    pub proxy_protocol: Field,
    pub max_connections: Field,
    pub connect_timeout: Field,
    pub connect_retries: Field,
    pub idle_timeout: Field,
    pub access_log: Field,
    pub health_check: Option<Sp<RawHealthCheck>>,
    pub udp: Option<Sp<RawUdp>>,
    pub backends: Option<Sp<Vec<Sp<RawBackend>>>>,
}

/// `defaults:`: the service fields that may be shared. `name`, `listen` and
/// `backends` are accepted by the parser only so that validation can say
/// why they do not belong here.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of service settings shared by all services"
)]
pub(crate) struct RawDefaults {
    pub name: Option<Sp<IgnoredAny>>,
    pub protocol: Field,
    pub listen: Option<Sp<IgnoredAny>>,
    pub balance: Field,
    pub transfer: Field,
    pub proxy_protocol: Field,
    pub max_connections: Field,
    pub connect_timeout: Field,
    pub connect_retries: Field,
    pub idle_timeout: Field,
    pub access_log: Field,
    pub health_check: Option<Sp<RawHealthCheck>>,
    pub udp: Option<Sp<RawUdp>>,
    pub backends: Option<Sp<IgnoredAny>>,
}

/// The settings a service and `defaults:` have in common, borrowed from
/// either.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CommonRef<'a> {
    pub protocol: &'a Field,
    pub balance: &'a Field,
    pub transfer: &'a Field,
    pub proxy_protocol: &'a Field,
    pub max_connections: &'a Field,
    pub connect_timeout: &'a Field,
    pub connect_retries: &'a Field,
    pub idle_timeout: &'a Field,
    pub access_log: &'a Field,
    pub health_check: &'a Option<Sp<RawHealthCheck>>,
    pub udp: &'a Option<Sp<RawUdp>>,
}

impl RawService {
    pub(crate) fn common(&self) -> CommonRef<'_> {
        CommonRef {
            protocol: &self.protocol,
            balance: &self.balance,
            transfer: &self.transfer,
            proxy_protocol: &self.proxy_protocol,
            max_connections: &self.max_connections,
            connect_timeout: &self.connect_timeout,
            connect_retries: &self.connect_retries,
            idle_timeout: &self.idle_timeout,
            access_log: &self.access_log,
            health_check: &self.health_check,
            udp: &self.udp,
        }
    }
}

impl RawDefaults {
    pub(crate) fn common(&self) -> CommonRef<'_> {
        CommonRef {
            protocol: &self.protocol,
            balance: &self.balance,
            transfer: &self.transfer,
            proxy_protocol: &self.proxy_protocol,
            max_connections: &self.max_connections,
            connect_timeout: &self.connect_timeout,
            connect_retries: &self.connect_retries,
            idle_timeout: &self.idle_timeout,
            access_log: &self.access_log,
            health_check: &self.health_check,
            udp: &self.udp,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of health check settings (kind, interval, timeout, rise, fall, ...)"
)]
pub(crate) struct RawHealthCheck {
    pub kind: Field,
    pub interval: Field,
    pub timeout: Field,
    pub rise: Field,
    pub fall: Field,
    pub send: Field,
    pub expect: Field,
    pub query: Field,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of udp settings (mode, session_timeout, query_timeout, max_sessions)"
)]
pub(crate) struct RawUdp {
    pub mode: Field,
    pub session_timeout: Field,
    pub query_timeout: Field,
    pub max_sessions: Field,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a backend mapping like `address: 10.0.0.1:443`"
)]
pub(crate) struct RawBackend {
    pub address: Field,
    pub weight: Field,
    pub max_connections: Field,
}

//! Names for the contract's enums as users write them: in YAML config, on the
//! command line and in `metadata["module_type"]`.
//!
//! Parsing is case-insensitive and accepts both the short name (`alb`, `http2`,
//! `healthy`) and the full proto name (`MODULE_TYPE_ALB`, `PROTOCOL_HTTP2`).
//! Display always gives the short, lowercase name.

use crate::pb::{HealthStatus, ModuleType, Protocol};

/// A name that is not one of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {given:?} (expected one of: {expected})")]
pub struct UnknownName {
    pub kind: &'static str,
    pub given: String,
    pub expected: String,
}

macro_rules! named_enum {
    ($ty:ident, $kind:literal, $prefix:literal, [$($variant:ident => $short:literal),+ $(,)?]) => {
        impl $ty {
            /// Every value but `*_UNSPECIFIED`.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The short lowercase name (`UNSPECIFIED` gives `"unspecified"`).
            pub fn short_name(self) -> &'static str {
                match self {
                    $($ty::$variant => $short,)+
                    _ => "unspecified",
                }
            }

            /// Parses a short or full name, case-insensitively.
            pub fn parse_name(given: &str) -> Result<Self, UnknownName> {
                let upper = given.trim().to_ascii_uppercase();
                let short = upper.strip_prefix($prefix).unwrap_or(&upper);
                $(if short.eq_ignore_ascii_case($short) {
                    return Ok($ty::$variant);
                })+
                Err(UnknownName {
                    kind: $kind,
                    given: given.to_string(),
                    expected: [$($short),+].join(", "),
                })
            }

            /// The value for a wire number, if it is a known one.
            pub fn from_wire(n: i32) -> Option<Self> {
                Self::try_from(n).ok()
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.short_name())
            }
        }
    };
}

named_enum!(ModuleType, "module type", "MODULE_TYPE_", [
    Alb => "alb",
    Dblb => "dblb",
    Ailb => "ailb",
    Rtmp => "rtmp",
    Nlb => "nlb",
]);

named_enum!(Protocol, "protocol", "PROTOCOL_", [
    Tcp => "tcp",
    Udp => "udp",
    Http => "http",
    Https => "https",
    Http2 => "http2",
    Http3 => "http3",
    Grpc => "grpc",
    Websocket => "websocket",
    Mysql => "mysql",
    Postgres => "postgres",
    Mongodb => "mongodb",
    Redis => "redis",
    Rtmp => "rtmp",
    Rtmps => "rtmps",
    Hls => "hls",
    Dash => "dash",
]);

named_enum!(HealthStatus, "health status", "HEALTH_STATUS_", [
    Healthy => "healthy",
    Degraded => "degraded",
    Unhealthy => "unhealthy",
    Starting => "starting",
    Stopping => "stopping",
    Stopped => "stopped",
]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_full_names_parse_case_insensitively() {
        assert_eq!(ModuleType::parse_name("alb"), Ok(ModuleType::Alb));
        assert_eq!(
            ModuleType::parse_name("MODULE_TYPE_DBLB"),
            Ok(ModuleType::Dblb)
        );
        assert_eq!(Protocol::parse_name("Http2"), Ok(Protocol::Http2));
        assert_eq!(
            Protocol::parse_name("protocol_postgres"),
            Ok(Protocol::Postgres)
        );
        assert_eq!(
            HealthStatus::parse_name(" healthy "),
            Ok(HealthStatus::Healthy)
        );
    }

    #[test]
    fn unknown_names_say_what_is_accepted() {
        let err = ModuleType::parse_name("nginx").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown module type \"nginx\" (expected one of: alb, dblb, ailb, rtmp, nlb)"
        );
        assert!(Protocol::parse_name("unspecified").is_err());
    }

    #[test]
    fn names_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::parse_name(p.short_name()), Ok(*p));
            assert_eq!(Protocol::from_wire(*p as i32), Some(*p));
        }
        assert_eq!(ModuleType::Unspecified.to_string(), "unspecified");
        assert_eq!(Protocol::from_wire(99), None);
    }
}

//! The contract's `Error` message, built from a gRPC status code.

use std::collections::HashMap;

use crate::pb::{Error, StatusCode};

/// The contract's status code closest to a gRPC code.
pub fn status_code_for(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::Ok => StatusCode::Ok,
        Code::NotFound => StatusCode::NotFound,
        Code::Unavailable | Code::DeadlineExceeded => StatusCode::Unavailable,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::InvalidArgument
        }
        Code::PermissionDenied | Code::Unauthenticated => StatusCode::PermissionDenied,
        Code::AlreadyExists => StatusCode::AlreadyExists,
        Code::ResourceExhausted => StatusCode::ResourceExhausted,
        _ => StatusCode::Error,
    }
}

impl Error {
    /// An `Error` with the given code and message, stamped now.
    pub fn new(code: StatusCode, message: impl Into<String>) -> Self {
        Error {
            code: code as i32,
            message: message.into(),
            details: HashMap::new(),
            occurred_at: Some(crate::time::now()),
        }
    }

    /// The `Error` mirroring a gRPC status.
    pub fn from_status(status: &tonic::Status) -> Self {
        let mut e = Error::new(status_code_for(status.code()), status.message());
        e.details
            .insert("grpc_code".to_string(), format!("{:?}", status.code()));
        e
    }

    /// Adds a detail.
    pub fn with_detail(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.details.insert(key.into(), value.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_mirror_grpc_statuses() {
        let e = Error::from_status(&tonic::Status::not_found("no instance alb-9"));
        assert_eq!(e.code, StatusCode::NotFound as i32);
        assert_eq!(e.message, "no instance alb-9");
        assert_eq!(e.details["grpc_code"], "NotFound");
        assert!(e.occurred_at.is_some());
    }
}

//! The contract's `Error` message, built from a gRPC status code.

use std::collections::HashMap;

use crate::pb::{Error, StatusCode};

/// The canonical name of a gRPC status code, as gRPC spells it
/// (`NOT_FOUND`, ...): metric labels, CLI messages.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

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

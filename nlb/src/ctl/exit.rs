//! Exit codes scripts can rely on, and the errors that lead to them.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | anything else (an unexpected status, output that cannot be written, ...) |
//! | 2 | usage error: bad flags, or a credential file (token, CA, cert, key) that cannot be used |
//! | 3 | the NLB cannot be reached: connect failure, `UNAVAILABLE`, `DEADLINE_EXCEEDED` |
//! | 4 | `UNAUTHENTICATED` or `PERMISSION_DENIED` |
//! | 5 | `NOT_FOUND` (an unknown instance or rollout, or no instance of the type asked for) |
//! | 6 | the input is invalid: `INVALID_ARGUMENT`, validation errors, an input file that is missing or not valid |
//! | 7 | a negative answer: a dry run that is not routed, a health check that is not healthy, a watched rollout that ends rolled back |

use std::process::ExitCode;

use tonic::Code;

/// What `nlbctl` exits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Failure = 1,
    Usage = 2,
    Unreachable = 3,
    Denied = 4,
    NotFound = 5,
    Invalid = 6,
    Negative = 7,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The exit code for a call that failed with `code`.
    pub fn for_code(code: Code) -> Self {
        match code {
            Code::Ok => Exit::Ok,
            Code::Unavailable | Code::DeadlineExceeded => Exit::Unreachable,
            Code::Unauthenticated | Code::PermissionDenied => Exit::Denied,
            Code::NotFound => Exit::NotFound,
            Code::InvalidArgument => Exit::Invalid,
            _ => Exit::Failure,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}

pub use shared_types::error::code_name;

/// An error and its causes, each said once: transport errors wrap the
/// useful part ("Connection refused") a few levels down.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Why a command did not succeed. Each variant has one exit code.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The command line is wrong, or a credential file cannot be used.
    #[error("{0}")]
    Usage(String),
    /// No connection to the NLB.
    #[error("cannot reach the NLB at {addr}: {detail}")]
    Connect { addr: String, detail: String },
    /// A call answered with an error status.
    #[error("{what}: {}", status_text(.status))]
    Status { what: String, status: tonic::Status },
    /// An input file is missing, unreadable or not valid (one problem per line).
    #[error("{}", prefixed(.path, .problems))]
    Input { path: String, problems: Vec<String> },
    /// The server checked the input and reported problems (one per line).
    #[error("{}", prefixed(.what, .problems))]
    Rejected { what: String, problems: Vec<String> },
    /// Something not foreseen by the codes above.
    #[error("{0}")]
    Other(String),
    /// Whoever read our output went away (a closed pipe): stop quietly.
    #[error("output closed")]
    OutputClosed,
}

fn prefixed(what: &str, problems: &[String]) -> String {
    if problems.is_empty() {
        return format!("{what}: refused without a reason");
    }
    problems
        .iter()
        .map(|p| format!("{what}: {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn status_text(status: &tonic::Status) -> String {
    let name = code_name(status.code());
    let mut message = status.message().to_string();
    // Statuses made from transport errors keep the cause in their source.
    if let Some(source) = std::error::Error::source(status) {
        let cause = error_chain(source);
        if !cause.is_empty() && !message.contains(&cause) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&cause);
        }
    }
    if message.is_empty() {
        name.to_string()
    } else {
        format!("{name}: {message}")
    }
}

impl CtlError {
    /// A failed call, named by what was asked (`modules show alb-9`).
    pub fn status(what: impl Into<String>, status: tonic::Status) -> Self {
        CtlError::Status {
            what: what.into(),
            status,
        }
    }

    /// An input file problem.
    pub fn input(path: impl Into<String>, problem: impl Into<String>) -> Self {
        CtlError::Input {
            path: path.into(),
            problems: vec![problem.into()],
        }
    }

    pub fn exit(&self) -> Exit {
        match self {
            CtlError::Usage(_) => Exit::Usage,
            CtlError::Connect { .. } => Exit::Unreachable,
            CtlError::Status { status, .. } => Exit::for_code(status.code()),
            CtlError::Input { .. } | CtlError::Rejected { .. } => Exit::Invalid,
            CtlError::Other(_) => Exit::Failure,
            CtlError::OutputClosed => Exit::Ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_documented_exits() {
        assert_eq!(Exit::for_code(Code::Unavailable), Exit::Unreachable);
        assert_eq!(Exit::for_code(Code::DeadlineExceeded), Exit::Unreachable);
        assert_eq!(Exit::for_code(Code::Unauthenticated), Exit::Denied);
        assert_eq!(Exit::for_code(Code::PermissionDenied), Exit::Denied);
        assert_eq!(Exit::for_code(Code::NotFound), Exit::NotFound);
        assert_eq!(Exit::for_code(Code::InvalidArgument), Exit::Invalid);
        assert_eq!(Exit::for_code(Code::FailedPrecondition), Exit::Failure);
        assert_eq!(Exit::for_code(Code::Internal), Exit::Failure);
        let codes: Vec<u8> = [
            Exit::Ok,
            Exit::Failure,
            Exit::Usage,
            Exit::Unreachable,
            Exit::Denied,
            Exit::NotFound,
            Exit::Invalid,
            Exit::Negative,
        ]
        .iter()
        .map(|e| e.code())
        .collect();
        assert_eq!(codes, vec![0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn messages_name_the_call_the_code_and_the_server_message() {
        let e = CtlError::status(
            "modules show alb-9",
            tonic::Status::not_found("no instance alb-9 is registered"),
        );
        assert_eq!(
            e.to_string(),
            "modules show alb-9: NOT_FOUND: no instance alb-9 is registered"
        );
        assert_eq!(e.exit(), Exit::NotFound);
        let e = CtlError::status("status", tonic::Status::new(Code::Internal, ""));
        assert_eq!(e.to_string(), "status: INTERNAL");
    }

    #[test]
    fn input_problems_name_the_file_on_every_line() {
        let e = CtlError::Input {
            path: "routes.yaml".into(),
            problems: vec!["routes[0].protocol: bad".into(), "routes[1]: bad".into()],
        };
        assert_eq!(
            e.to_string(),
            "routes.yaml: routes[0].protocol: bad\nroutes.yaml: routes[1]: bad"
        );
        assert_eq!(e.exit(), Exit::Invalid);
    }
}

//! Writing results: aligned tables and key/value blocks for people, JSON for
//! scripts, timestamps as RFC 3339 UTC. Results go to stdout; errors and
//! hints go to stderr (see [`super::report`]).

use std::io::Write;

use prost_types::Timestamp;
use serde_json::Value;

use super::exit::CtlError;

/// Where results go, and in which form.
pub struct Out {
    json: bool,
    w: Box<dyn Write + Send>,
}

impl Out {
    /// Results on stdout.
    pub fn stdout(json: bool) -> Self {
        Out {
            json,
            w: Box::new(std::io::stdout()),
        }
    }

    /// Whether `--json` was asked.
    pub fn json(&self) -> bool {
        self.json
    }

    fn write(&mut self, text: &str) -> Result<(), CtlError> {
        let r = self
            .w
            .write_all(text.as_bytes())
            .and_then(|()| self.w.flush());
        r.map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => CtlError::OutputClosed,
            _ => CtlError::Other(format!("cannot write the output: {e}")),
        })
    }

    /// Text, ending with a newline.
    pub fn text(&mut self, text: &str) -> Result<(), CtlError> {
        if text.ends_with('\n') {
            self.write(text)
        } else {
            self.write(&format!("{text}\n"))
        }
    }

    /// One JSON document, pretty-printed.
    pub fn document(&mut self, v: &Value) -> Result<(), CtlError> {
        let text = serde_json::to_string_pretty(v)
            .map_err(|e| CtlError::Other(format!("cannot encode JSON: {e}")))?;
        self.text(&text)
    }

    /// One JSON document on one line (for streams).
    pub fn line(&mut self, v: &Value) -> Result<(), CtlError> {
        let text = serde_json::to_string(v)
            .map_err(|e| CtlError::Other(format!("cannot encode JSON: {e}")))?;
        self.text(&text)
    }
}

/// A table with a header row; columns are left-aligned and separated by two
/// spaces; no trailing spaces.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate().take(n) {
                if i > 0 {
                    s.push_str("  ");
                }
                s.push_str(c);
                if i + 1 < n {
                    s.push_str(&" ".repeat(widths[i] - c.chars().count()));
                }
            }
            s.trim_end().to_string()
        };
        let mut out = line(&self.headers);
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
}

/// `key: value` lines with the values aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(format!("{:width$}  {v}", format!("{k}:")).trim_end());
        out.push('\n');
    }
    out
}

/// A number for people: integers as integers, others with up to 3 decimals.
pub fn num(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.is_finite() {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        v.to_string()
    }
}

/// `-` for an empty string.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// `k=v,k=v`, sorted by key; `-` when empty.
pub fn pairs<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut v: Vec<(&String, &String)> = map.into_iter().collect();
    v.sort();
    let s: Vec<String> = v.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    or_dash(&s.join(","))
}

/// Days since 1970-01-01 as a proleptic Gregorian (year, month, day).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    // Shift the epoch to 0000-03-01 so leap days end each 4/100/400-year cycle.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// RFC 3339 UTC, to the second (`2026-08-04T07:09:21Z`) or the millisecond.
pub fn rfc3339(ts: &Timestamp, millis: bool) -> String {
    let days = ts.seconds.div_euclid(86_400);
    let secs = ts.seconds.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    if millis {
        let ms = ts.nanos.clamp(0, 999_999_999) / 1_000_000;
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
    } else {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
    }
}

/// A timestamp for people: `-` when absent or zero.
pub fn when(ts: Option<&Timestamp>) -> String {
    match ts {
        Some(t) if t.seconds != 0 || t.nanos != 0 => rfc3339(t, false),
        _ => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_without_trailing_spaces() {
        let mut t = Table::new(&["ID", "TYPE", "NOTE"]);
        t.row(vec!["alb-1".into(), "alb".into(), "".into()]);
        t.row(vec!["dblb-10".into(), "dblb".into(), "x".into()]);
        assert_eq!(
            t.render(),
            "ID       TYPE  NOTE\nalb-1    alb\ndblb-10  dblb  x\n"
        );
    }

    #[test]
    fn key_values_align() {
        let s = key_values(&[("status", "healthy".into()), ("version", "0.1.0".into())]);
        assert_eq!(s, "status:   healthy\nversion:  0.1.0\n");
        let s = key_values(&[("a", "1".into()), ("longer key", "2".into())]);
        assert_eq!(s, "a:           1\nlonger key:  2\n");
    }

    #[test]
    fn numbers_for_people() {
        assert_eq!(num(3.0), "3");
        assert_eq!(num(0.5), "0.5");
        assert_eq!(num(2.0 / 3.0), "0.667");
        assert_eq!(num(-1.0), "-1");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let ts = |seconds, nanos| Timestamp { seconds, nanos };
        assert_eq!(rfc3339(&ts(0, 0), false), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(&ts(1_700_000_000, 123_456_789), true),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(rfc3339(&ts(951_782_400, 0), false), "2000-02-29T00:00:00Z");
        assert_eq!(
            rfc3339(&ts(4_107_542_399, 0), false),
            "2100-02-28T23:59:59Z"
        );
        assert_eq!(rfc3339(&ts(-1, 0), false), "1969-12-31T23:59:59Z");
        assert_eq!(when(None), "-");
        assert_eq!(when(Some(&ts(0, 0))), "-");
    }
}
